"""The HTTP server over real loopback sockets: uvicorn in a thread on a free 127.0.0.1 port, queried with the
official `openai` client unchanged and with httpx for admin routes, errors and attacks. Every request loop
is bounded in count and time. Expected texts come from an Engine run on the same model and pool.
"""

from __future__ import annotations

import contextlib
import io
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from serve_helpers import LoopbackServer, make_adapter

import loraplex as lp
from loraplex import cli, models
from loraplex.errors import ConfigError, QueueFullError
from loraplex.workflows.evaluate import BASE, EvalResult
from loraplex.serve import Engine, EngineConfig, SamplingParams
from loraplex.serve.app import Server, create_app
from loraplex.serve.ui import set_results

KEY = "test-admin-key"
ADMIN = {"Authorization": f"Bearer {KEY}"}
IGNORE_EOS = {"ignore_eos": True}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def new_server(folder: Path, **cfg) -> Server:
    config = EngineConfig(**{"max_batch": 4, "max_queue": 8, "max_prompt_tokens": 64, "max_new_tokens": 32, **cfg})
    return Server(models.tiny_llama(seed=0), None, base_id="tiny-llama", adapters_dir=folder, config=config,
                  api_key=KEY, max_upload_bytes=200_000, shutdown_timeout=30)


@contextlib.contextmanager
def serving(folder: Path, names: list[str]) -> Iterator[tuple[Server, LoopbackServer]]:
    """A tiny server on loopback over `folder`, which gets one random adapter per name (seeds 1, 2, ...)."""
    for i, name in enumerate(names):
        make_adapter(folder / name, seed=i + 1)
    server = new_server(folder)
    loop = LoopbackServer(create_app(server)).start()
    try:
        yield server, loop
    finally:
        loop.stop()


@pytest.fixture(scope="module")
def served(tmp_path_factory, one_thread):
    with serving(tmp_path_factory.mktemp("adapters"), ["legal", "tone", "swap"]) as running:
        yield running


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=f"{served[1].url}/v1", api_key="anything", max_retries=0, timeout=30)


@pytest.fixture
def http(served):
    with httpx.Client(base_url=served[1].url, timeout=30) as c:
        yield c


def expected(server: Server, prompt: str, model: str, n: int = 8) -> str:
    eng = Engine(server.model, server.pool, server.codec, base_ids=server.base_ids, config=server.engine.config)
    return eng.generate(server.codec.encode(prompt), model, SamplingParams(max_tokens=n, temperature=0.0,
                                                                            ignore_eos=True)).text


def zipped(directory: Path, prefix: str = "") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in sorted(directory.iterdir()):
            zf.write(f, prefix + f.name)
    return buf.getvalue()


# ---- the OpenAI API through the official client -----------------------------------------------------------
def test_models_completions_and_chat(served, client):
    server, _ = served
    ids = [m.id for m in client.models.list()]
    assert ids[0] == "tiny-llama" and {"legal", "tone", "swap"} <= set(ids)
    for model in ["legal", "tiny-llama", "base", "legal:0.5+tone:0.5"]:
        r = client.completions.create(model=model, prompt="Hello", max_tokens=8, temperature=0, extra_body=IGNORE_EOS)
        assert r.choices[0].text == expected(server, "Hello", model)
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8 and r.model == model
    assert expected(server, "Hello", "legal") != expected(server, "Hello", "base")
    chat = client.chat.completions.create(model="tone", messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                          temperature=0, extra_body=IGNORE_EOS)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == expected(server, "<|user|>\nHi\n<|assistant|>\n", "tone", 6)


def test_streaming_equals_non_streaming(client):
    kw = dict(model="legal", max_tokens=10, temperature=0, extra_body=IGNORE_EOS)
    whole = client.completions.create(prompt="Stream me", **kw).choices[0].text
    chunks = list(client.completions.create(prompt="Stream me", stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == whole and chunks[-1].choices[0].finish_reason == "length"
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    whole = client.chat.completions.create(messages=msgs, **kw).choices[0].message.content
    stream = client.chat.completions.create(messages=msgs, stream=True, stream_options={"include_usage": True}, **kw)
    parts = list(stream)
    text = "".join(p.choices[0].delta.content or "" for p in parts if p.choices)
    assert text == whole and parts[-1].usage.completion_tokens == 10


def test_stop_strings_and_sampling_over_http(served, client):
    server, _ = served
    free = expected(server, "Stop test", "tone", 12)
    stop = free[4:6]
    r = client.completions.create(model="tone", prompt="Stop test", max_tokens=12, temperature=0, stop=[stop],
                                  extra_body=IGNORE_EOS)
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == free[: free.index(stop)]
    a, b = (client.completions.create(model="tone", prompt="x", max_tokens=8, temperature=1.2, top_p=0.9, seed=3,
                                      extra_body=IGNORE_EOS).choices[0].text for _ in range(2))
    assert a == b


# ---- errors -------------------------------------------------------------------------------------------------
def _is_error(resp: httpx.Response, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) >= {"message", "type", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


def test_error_statuses_and_bodies(client, http):
    with pytest.raises(openai.NotFoundError) as exc:
        client.completions.create(model="nope", prompt="x")
    assert exc.value.body["code"] == "model_not_found"
    _is_error(http.post("/v1/completions", json={"model": "legal"}), 400, "invalid_body")
    _is_error(http.post("/v1/completions", json={"model": "legal", "prompt": "x", "temperature": -1}), 400)
    _is_error(http.post("/v1/completions", json={"model": "legal", "prompt": "x", "n": 17}), 400)
    _is_error(http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}), 400)
    _is_error(http.post("/v1/completions", json={"model": "legal", "prompt": "x" * 65}), 413, "request_too_large")
    _is_error(http.post("/v1/completions", json={"model": "legal", "prompt": "x", "max_tokens": 33}), 400)
    _is_error(http.post("/v1/completions", json={"model": "legal:zz", "prompt": "x"}), 400)
    _is_error(http.post("/v1/chat/completions", json={"model": "legal", "messages": []}), 400)
    _is_error(http.get("/v1/nothing-here"), 404)


def test_queue_full_is_429(served, http, client):
    server, _ = served
    gate, paused = threading.Event(), threading.Event()

    def hold() -> None:  # the engine thread parks here after a step until the gate opens
        paused.set()
        gate.wait(30)

    server.engine.on_step = hold
    long = SamplingParams(max_tokens=32, ignore_eos=True)
    handles = [server.engine.submit([5, 6], "legal", long)]
    try:
        assert paused.wait(30)
        for _ in range(64):  # bounded: the queue holds 8
            try:
                handles.append(server.engine.submit([5, 6], "legal", long))
            except QueueFullError:
                break
        assert server.engine.waiting == server.engine.config.max_queue
        _is_error(http.post("/v1/completions", json={"model": "legal", "prompt": "x"}), 429, "queue_full")
        with pytest.raises(openai.RateLimitError):  # the official client's class for 429
            client.completions.create(model="legal", prompt="x")
    finally:
        for h in handles:
            h.cancel()
        server.engine.on_step = server.store.poll_evictions
        gate.set()
    for h in handles:
        assert h.result(30).finish_reason in ("cancelled", "length")


@pytest.mark.parametrize("stream", [False, True])
def test_client_disconnect_cancels_the_generation(served, stream):
    """A client that goes away mid-request (read timeout, connection closed) frees its batch row: the request
    ends as "cancelled" long before its 32 slowed-down steps would have finished."""
    server, loop = served
    key = "tone"
    slow_step = threading.Event()

    def slow(*_):
        slow_step.set()
        time.sleep(0.2)  # 32 steps: >= 6.4 s to finish

    before = server.engine.metrics.value("loraplex_requests_total", adapter=key, status="cancelled")
    ok_before = server.engine.metrics.value("loraplex_requests_total", adapter=key, status="ok")
    server.engine.on_step = slow
    try:
        body = {"model": key, "prompt": "hello", "max_tokens": 32, "stream": stream, **IGNORE_EOS}
        read_s = 5.0 if stream else 0.5  # streamed: wait for the first event; else: time out well before the end
        with httpx.Client(base_url=loop.url, timeout=httpx.Timeout(30, read=read_s)) as c:
            if stream:  # read the first event, then hang up
                with c.stream("POST", "/v1/completions", json=body) as r:
                    assert next(r.iter_bytes()).startswith(b"data: ")
            else:  # the answer takes > 6 s: the read times out and the client closes the connection
                with pytest.raises(httpx.ReadTimeout):
                    c.post("/v1/completions", json=body)
        assert slow_step.wait(5)
        deadline = time.monotonic() + 10  # bounded; "cancelled" can only come from the hang-up
        while server.engine.metrics.value("loraplex_requests_total", adapter=key, status="cancelled") == before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.engine.metrics.value("loraplex_requests_total", adapter=key, status="cancelled") == before + 1
        assert server.engine.metrics.value("loraplex_requests_total", adapter=key, status="ok") == ok_before  # it did not run to the end
    finally:
        server.engine.on_step = server.store.poll_evictions


# ---- admin ----------------------------------------------------------------------------------------------------
def test_admin_needs_the_key(http):
    _is_error(http.post("/v1/adapters", json={"name": "legal"}), 401, "invalid_api_key")
    _is_error(http.delete("/v1/adapters/legal", headers={"Authorization": "Bearer wrong"}), 401)


def test_load_replace_delete_by_name(served, client, http):
    server, _ = served
    folder = server.store.directory
    make_adapter(folder / "extra", seed=11)
    assert http.post("/v1/adapters", json={"name": "extra"}, headers=ADMIN).status_code == 200
    _is_error(http.post("/v1/adapters", json={"name": "extra"}, headers=ADMIN), 409, "adapter_exists")
    v1 = expected(server, "abc", "extra")
    make_adapter(folder / "extra", seed=12)
    r = http.post("/v1/adapters", json={"name": "extra", "replace": True}, headers=ADMIN)
    assert r.status_code == 200 and r.json()["content_hash"] == server.store.info("extra").content_hash
    got = client.completions.create(model="extra", prompt="abc", max_tokens=8, temperature=0, extra_body=IGNORE_EOS)
    assert got.choices[0].text == expected(server, "abc", "extra") != v1
    assert http.delete("/v1/adapters/extra", headers=ADMIN).json()["deleted"] is True
    _is_error(http.delete("/v1/adapters/extra", headers=ADMIN), 404)
    assert "extra" not in [m.id for m in client.models.list()]
    _is_error(http.post("/v1/adapters", json={"name": "not-in-folder"}, headers=ADMIN), 404)
    _is_error(http.post("/v1/adapters", json={"name": "tiny-llama"}, headers=ADMIN), 409)


def test_path_traversal_is_refused(served, http, tmp_path):
    server, _ = served
    folder = server.store.directory
    make_adapter(folder.parent / "outside", seed=5)  # a real adapter one level above the folder
    for name in ["../outside", "..", "a/b", "..\\outside", "/etc", "%2e%2e"]:
        assert http.post("/v1/adapters", json={"name": name}, headers=ADMIN).status_code in (404, 400)
    for path in ["/v1/adapters/..%2Foutside", "/v1/adapters/../outside", "/v1/adapters/%2e%2e"]:
        assert http.delete(path, headers=ADMIN).status_code in (404, 405, 400)
    good = zipped(folder / "legal")
    _is_error(http.post("/v1/adapters", params={"name": "../evil"}, content=good,
                        headers={**ADMIN, "content-type": "application/zip"}), 400)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("../evil/adapter_config.json", "{}")
        zf.writestr("/abs/adapter_model.safetensors", "x")
    _is_error(http.post("/v1/adapters", params={"name": "evil"}, content=buf.getvalue(),
                        headers={**ADMIN, "content-type": "application/zip"}), 400, "invalid_adapter")
    assert not (folder.parent / "evil").exists() and not (folder / "evil").exists()
    assert "outside" not in server.store.names()


def test_upload_zip(served, client, http, tmp_path):
    server, _ = served
    make_adapter(tmp_path / "up", seed=21)
    r = http.post("/v1/adapters", params={"name": "uploaded"}, content=zipped(tmp_path / "up", "up/"),
                  headers={**ADMIN, "content-type": "application/zip"})
    assert r.status_code == 200, r.text
    assert (server.store.directory / "uploaded" / "adapter_config.json").is_file()
    ref = lp.load_adapter(models.tiny_llama(seed=0), tmp_path / "up", "u")  # the same content as a file
    assert server.store.info("uploaded").content_hash == ref.content_hash
    out = client.completions.create(model="uploaded", prompt="up", max_tokens=6, temperature=0, extra_body=IGNORE_EOS)
    assert out.choices[0].text == expected(server, "up", "uploaded", 6)
    _is_error(http.post("/v1/adapters", params={"name": "big"}, content=b"0" * 200_001,
                        headers={**ADMIN, "content-type": "application/zip"}), 413, "request_too_large")
    _is_error(http.post("/v1/adapters", params={"name": "junk"}, content=b"PK not really",
                        headers={**ADMIN, "content-type": "application/zip"}), 400, "invalid_adapter")
    other = models.tiny_llama(seed=0, num_hidden_layers=3)
    lp.inject(other, lp.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), "a")
    lp.save_adapter(other, "a", tmp_path / "other")
    _is_error(http.post("/v1/adapters", params={"name": "other"}, content=zipped(tmp_path / "other"),
                        headers={**ADMIN, "content-type": "application/zip"}), 400)
    assert not (server.store.directory / "other").exists()
    assert http.delete("/v1/adapters/uploaded", headers=ADMIN).status_code == 200


def test_health_and_metrics(http, client):
    assert http.get("/health").json()["status"] == "ok"
    client.completions.create(model="legal", prompt="m", max_tokens=3, temperature=0, extra_body=IGNORE_EOS)
    text = http.get("/metrics").text
    assert 'loraplex_requests_total{adapter="legal",status="ok"}' in text
    assert 'loraplex_generated_tokens_total{adapter="legal"}' in text
    assert 'loraplex_request_latency_seconds_count{adapter="legal"}' in text
    assert 'loraplex_adapter_loads_total{adapter="legal"} 1' in text
    assert "# TYPE loraplex_adapter_evictions_total counter" in text and "loraplex_queue_waiting " in text


# ---- faults: adapters change while requests run -------------------------------------------------------------
def test_adapters_loaded_unloaded_replaced_under_load(served, tmp_path):
    server, loop = served
    for v in (1, 2):
        make_adapter(tmp_path / f"swap{v}", seed=30 + v)
    want: dict[str, set[str]] = {"legal": {expected(server, "fault", "legal")}, "swap": set()}
    with httpx.Client(base_url=loop.url, timeout=30) as h:
        for v in (2, 1):  # learn both versions' answers, end on version 1
            assert h.post("/v1/adapters", params={"name": "swap", "replace": "true"}, content=zipped(tmp_path / f"swap{v}"),
                          headers={**ADMIN, "content-type": "application/zip"}).status_code == 200
            want["swap"].add(expected(server, "fault", "swap"))
    assert len(want["swap"]) == 2
    make_adapter(server.store.directory / "churn", seed=40)
    failures: list[str] = []
    deadline = time.monotonic() + 60

    def clients(model: str) -> None:
        c = openai.OpenAI(base_url=f"{loop.url}/v1", api_key="x", max_retries=0, timeout=30)
        for i in range(6):
            if time.monotonic() > deadline:
                break
            kw = dict(model=model, max_tokens=8, temperature=0, extra_body=IGNORE_EOS)
            if i % 2:
                text = "".join(ch.choices[0].text for ch in c.completions.create(prompt="fault", stream=True, **kw))
            else:
                text = c.completions.create(prompt="fault", **kw).choices[0].text
            if text not in want[model]:
                failures.append(f"{model}: {text!r}")

    def admin() -> None:
        with httpx.Client(base_url=loop.url, timeout=30) as h:
            for i in range(6):
                if time.monotonic() > deadline:
                    break
                codes = [h.post("/v1/adapters", json={"name": "churn"}, headers=ADMIN).status_code,
                         h.post("/v1/adapters", params={"name": "swap", "replace": "true"},
                                content=zipped(tmp_path / f"swap{2 - i % 2}"),
                                headers={**ADMIN, "content-type": "application/zip"}).status_code,
                         h.delete("/v1/adapters/churn", headers=ADMIN).status_code]
                if codes != [200, 200, 200]:
                    failures.append(f"admin round {i}: {codes}")

    threads = [threading.Thread(target=clients, args=(m,)) for m in ("legal", "swap", "legal", "swap")]
    threads.append(threading.Thread(target=admin))
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not failures, failures
    assert server.engine.failed is None and server.pool.stats.adapters == len(server.store.names())


# ---- graceful shutdown ----------------------------------------------------------------------------------------
def test_shutdown_finishes_in_flight_requests(tmp_path):
    make_adapter(tmp_path / "legal", seed=1)
    server = new_server(tmp_path)
    server.engine.on_step = lambda: time.sleep(0.02)  # slow steps: the stream is surely in flight at stop
    loop = LoopbackServer(create_app(server)).start()
    want = expected(server, "bye", "legal", 32)
    client = openai.OpenAI(base_url=f"{loop.url}/v1", api_key="x", max_retries=0, timeout=30)
    got: list[str] = []
    started = threading.Event()

    def run() -> None:
        stream = client.completions.create(model="legal", prompt="bye", max_tokens=32, temperature=0, stream=True,
                                           extra_body=IGNORE_EOS)
        for ch in stream:
            started.set()
            got.append(ch.choices[0].text)

    t = threading.Thread(target=run)
    t.start()
    assert started.wait(30)
    at_stop = len(got)
    loop.stop()  # graceful: no new connections, in-flight responses finish, then the engine drains
    t.join(30)
    assert at_stop < 32 and "".join(got) == want
    assert not server.engine.accepting and server.engine.failed is None
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{loop.url}/health", timeout=2)


# ---- timeouts ---------------------------------------------------------------------------------------------------
def test_request_timeout_is_504_and_a_stream_error_event(tmp_path):
    make_adapter(tmp_path / "legal", seed=1)
    server = new_server(tmp_path, timeout_s=0.5)
    server.engine.on_step = lambda: time.sleep(0.05)  # 32 tokens take >= 1.6 s: past the 0.5 s limit
    loop = LoopbackServer(create_app(server)).start()
    try:
        with httpx.Client(base_url=loop.url, timeout=30) as h:
            body = {"model": "legal", "prompt": "slow", "max_tokens": 32, "ignore_eos": True}
            err = _is_error(h.post("/v1/completions", json=body), 504, "timeout")
            assert "--timeout" in err["message"] and err["type"] == "server_error"
        client = openai.OpenAI(base_url=f"{loop.url}/v1", api_key="x", max_retries=0, timeout=30)
        got: list[str] = []
        with pytest.raises(openai.APIError, match="time limit"):
            for ch in client.completions.create(model="legal", prompt="slow", max_tokens=32, stream=True,
                                                extra_body=IGNORE_EOS):
                got.append(ch.choices[0].text)
        assert len("".join(got)) < 32  # the stream started, then ended with the error event
        with pytest.raises(openai.InternalServerError) as exc:  # 5xx: the official client's class
            client.completions.create(model="legal", prompt="slow", max_tokens=32, extra_body=IGNORE_EOS)
        assert exc.value.status_code == 504
        short = client.completions.create(model="legal", prompt="q", max_tokens=2, extra_body=IGNORE_EOS)
        assert short.choices[0].finish_reason == "length"  # the server still serves after timeouts
        text = httpx.get(f"{loop.url}/metrics").text
        assert 'loraplex_requests_total{adapter="legal",status="error"} 3' in text
    finally:
        loop.stop()


# ---- admin disabled, the web page's data, --results ---------------------------------------------------------
def test_admin_routes_are_disabled_without_a_key(tmp_path):
    server = Server(models.tiny_llama(seed=0), None, base_id="tiny-llama", adapters_dir=tmp_path,
                    config=EngineConfig(max_prompt_tokens=16, max_new_tokens=8))
    loop = LoopbackServer(create_app(server)).start()
    try:
        err = _is_error(httpx.post(f"{loop.url}/v1/adapters", json={"name": "x"}, headers=ADMIN), 401)
        assert "--api-key" in err["message"]
    finally:
        loop.stop()


def test_ui_data_lists_adapters_and_reads_results(served, http, tmp_path):
    server, _ = served
    assert http.post("/v1/completions", json={"model": "legal", "prompt": "u", "max_tokens": 2}).status_code == 200
    assert "<title>loraplex</title>" in http.get("/ui").text
    data = http.get("/ui/data").json()
    rows = {a["name"]: a for a in data["adapters"]}
    assert set(rows) == set(server.store.names()) and data["base"] == "tiny-llama"
    legal = server.store.info("legal")
    files = server.store.directory / "legal"
    assert rows["legal"]["content_hash"] == legal.content_hash and rows["legal"]["r"] == 4
    assert rows["legal"]["bytes"] == sum(f.stat().st_size for f in files.iterdir())
    assert data["results"] is None and data["results_error"] is None and rows["legal"]["scores"] is None
    counts = server.metrics.snapshot("legal")
    assert rows["legal"]["served"] == counts and counts["requests"] >= 1 and counts["generated_tokens"] >= 1
    app = served[1].server.config.app  # the app the loopback server runs
    results = tmp_path / "results.json"
    scores = {BASE: {"loss": 3.0}, "legal": {"loss": 2.5}, "tone": {"loss": 2.75}}
    EvalResult("tiny-llama", "d.jsonl", ["loss"], scores,
               {"legal": {"content_hash": legal.content_hash}, "tone": {"content_hash": "sha256:old"}}, 4, 16, 0
               ).save(results)
    try:
        set_results(app, results)
        data = http.get("/ui/data").json()
        rows = {a["name"]: a for a in data["adapters"]}
        assert rows["legal"]["scores"] == {"loss": 2.5} and data["base_scores"] == {"loss": 3.0}
        assert rows["tone"]["stale"] is True and rows["tone"]["scores"] is None  # scored another version
        results.write_text("{broken")  # re-read per request: the page says why, and still lists adapters
        data = http.get("/ui/data").json()
        assert data["results"] is None and "cannot read eval results" in data["results_error"]
        assert len(data["adapters"]) == len(server.store.names())
    finally:
        set_results(app, None)
    with pytest.raises(ConfigError, match="cannot read"):
        set_results(app, tmp_path / "missing.json")


def test_cli_refuses_a_missing_results_file(tmp_path, capsys):
    code = cli.main(["serve", "--base", "tiny-llama", "--results", str(tmp_path / "none.json")])
    assert code == 1 and "loraplex eval --out" in capsys.readouterr().err
