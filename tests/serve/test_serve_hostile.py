"""The server against a hostile (or unlucky) user: numeric fields that pass validation but break the math,
adapter files that vanish or lie, corrupt uploads, bad text, bad names, huge prompts, bad flags. The rule
checked everywhere: a request fails alone, with a typed error, and the engine keeps serving.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import struct
import threading
import zipfile
from pathlib import Path

import httpx
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from serve_helpers import LoopbackServer, make_adapter, rewrite_adapter
from test_serve_engine import GREEDY, build
from test_serve_http import ADMIN, KEY, _is_error, http, new_server, serving, zipped  # noqa: F401 (http: a fixture)

from loraplex import cli, models
from loraplex.errors import (
    AdapterFileError,
    ConfigError,
    LoraplexError,
    NonFiniteError,
    RequestTooLargeError,
)
from loraplex.runtime.sampling import MIN_TEMPERATURE, sample_next
from loraplex.serve import EngineConfig, SamplingParams
from loraplex.serve.app import Server, create_app
from loraplex.serve.text import ByteTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread

# numbers a client can send (JSON or Python): the edges of every range, tiny and huge, and not numbers at all
NUMBERS = st.one_of(
    st.sampled_from([0, 0.0, -0.0, 1, -1, 1e-300, 1e-45, 5e-324, 1e300, 1e38, -1e38, 100.0, 100.0001, 2**63 - 1,
                     2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 10**40, math.nan, math.inf, -math.inf,
                     True, None, "1", [1]]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**70), max_value=2**70),
)


# ---- the sampler and its bounds ---------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(t=NUMBERS, p=NUMBERS, seed=NUMBERS, scale=st.sampled_from([1.0, 1e-30, 1e30, 3e38]), rng=st.integers(0, 99))
@example(t=1e-300, p=1.0, seed=None, scale=1.0, rng=0).via("issue 15: temperature 1e-300 killed the engine")
@example(t=1e-45, p=1.0, seed=None, scale=1.0, rng=0).via("issue 15: temperature 1e-45 killed the engine")
@example(t=1.0, p=1e-300, seed=None, scale=1.0, rng=0).via("issue 15: top_p 1e-300 killed the engine")
def test_sampling_params_accept_only_values_the_sampler_can_use(t, p, seed, scale, rng):
    """Whatever SamplingParams accepts, the sampler turns any finite logits into a valid token, the most
    likely one when the temperature is under MIN_TEMPERATURE or top_p is tiny; whatever it refuses is a
    ConfigError."""
    try:
        params = SamplingParams(max_tokens=4, temperature=t, top_p=p, seed=seed)
    except ConfigError:
        return
    logits = torch.randn(1, 64, generator=torch.Generator().manual_seed(rng)) * scale
    logits = logits.clamp(-3e38, 3e38)  # (1, 64) finite, up to float32's largest magnitude
    tok = int(sample_next(logits, [params], [params.generator(logits.device)])[0])
    assert 0 <= tok < 64
    if params.temperature < MIN_TEMPERATURE:
        assert tok == int(logits[0].argmax())
    elif params.top_p < 1e-6:  # only the most likely token is kept (ties broken either way)
        probs = torch.softmax((logits[0] - logits[0].max()) / params.temperature, -1)
        assert probs[tok] == probs.max()


def test_sampling_params_refuse_what_breaks_the_math():
    for bad in [dict(temperature=math.nan), dict(temperature=math.inf), dict(temperature=-1e-9),
                dict(temperature=100.5), dict(top_p=0.0), dict(top_p=math.nan), dict(top_p=1.5),
                dict(seed=2**64), dict(seed=-(2**63) - 1), dict(seed=1.5), dict(seed=10**5000), dict(max_tokens=-1),
                dict(max_tokens=True), dict(temperature="1"), dict(stop=("",)), dict(stop="ab")]:
        with pytest.raises(ConfigError):
            SamplingParams(**bad)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(temperature=1e-300).greedy and SamplingParams(seed=2**64 - 1, temperature=1.0).generator(
        torch.device("cpu")) is not None


# ---- the engine keeps serving -------------------------------------------------------------------------------
def test_engine_survives_a_fuzz_of_every_numeric_field(tmp_path):
    """temperature, top_p, max_tokens, seed and mix weights over edge values: every request either is refused
    at once with a typed error or finishes (with a typed error at most); the engine never stops."""
    _, eng, _ = build(tmp_path, ["r1", "r2"], max_new_tokens=8)
    want = eng.generate([5, 6, 7], "r1", SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)).token_ids

    valid = st.fixed_dictionaries(dict(
        t=st.floats(0, 100), p=st.floats(0, 1, exclude_min=True), n=st.integers(1, 8),
        seed=st.one_of(st.none(), st.integers(-(2**63), 2**64 - 1)),
        w1=st.one_of(st.none(), st.floats(-100, 100)), w2=st.one_of(st.none(), st.floats(-100, 100))))
    hostile = st.dictionaries(st.sampled_from(["t", "p", "n", "seed", "w1", "w2"]), NUMBERS, max_size=2)
    ok = dict(t=0.0, p=1.0, n=4, seed=None, w1=None, w2=None)

    @settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(v=valid, h=hostile)
    @example(v=ok, h=dict(w1=1e300)).via("issue 15: r1:1e300, greedy")
    @example(v=ok, h=dict(w1=1e38, w2=1e38)).via("issue 15: r1:1e38+r2:1e38")
    @example(v=ok, h=dict(t=1.0, seed=2**64)).via("issue 15: seed >= 2**64")
    @example(v=ok, h=dict(t=1e-300)).via("issue 15: temperature 1e-300")
    @example(v=ok, h=dict(t=1.0, p=1e-300)).via("issue 15: top_p 1e-300")
    def run(v, h):  # valid values with at most two replaced by hostile ones
        t, p, n, seed, w1, w2 = ({**v, **h}[k] for k in ("t", "p", "n", "seed", "w1", "w2"))
        model = "r1" if w1 is None else f"r1:{w1!r}" + ("" if w2 is None else f"+r2:{w2!r}")
        try:
            res = eng.generate([5, 6, 7], model, SamplingParams(max_tokens=n, temperature=t, top_p=p, seed=seed,
                                                                 ignore_eos=True))
        except LoraplexError:
            refused.append(1)
        else:
            assert res.finish_reason in ("length", "stop") or isinstance(res.error, LoraplexError)
            ran.append(res.finish_reason)
        assert eng.failed is None and not eng.lanes and not eng.waiting

    ran: list[str] = []
    refused: list[int] = []
    run()
    assert len(ran) >= 20 and len(refused) >= 20  # both kinds were exercised
    after = eng.generate([5, 6, 7], "r1", SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    assert after.token_ids == want


def test_mix_weights_are_bounded(tmp_path):
    _, eng, _ = build(tmp_path, ["r1", "r2"])
    for bad in ["r1:1e300", "r1:1e38+r2:1e38", "r1:-101", "r1:nan", "r1:1e-300x"]:
        with pytest.raises(ConfigError):
            eng.submit([5], bad)
    for good in ["r1:100", "r1:-100+r2:0", "r1:1e-300", "r1:0"]:
        assert eng.generate([5], good, GREEDY).finish_reason == "length"


def test_nonfinite_logits_fail_only_that_request_and_leave_no_nan_in_its_lane(tmp_path):
    """An adapter with huge (finite) weights overflows the activations: that request fails with
    NonFiniteError, the request running beside it is untouched, and the next request on its lane too."""
    _, eng, store = build(tmp_path, ["r1"], max_batch=2)
    make_adapter(tmp_path / "huge", seed=9, gain=1e30)
    store.load("huge")
    prompt = [40, 41, 42, 43, 44, 45]
    alone = eng.generate(prompt, "r1", GREEDY).token_ids
    bad, good = eng.submit(prompt, "huge", GREEDY), eng.submit(prompt, "r1", GREEDY)
    while eng.lanes or eng.waiting:
        eng.step()
    assert isinstance(bad.result().error, NonFiniteError) and "mix weights" in str(bad.result().error)
    assert good.result().token_ids == alone
    # the lane the NaN request used is reused by a short prompt whose masked positions are past its own length
    short = eng.submit([40, 41], "r1", GREEDY), eng.submit([40, 41], "r1", GREEDY)
    while eng.lanes or eng.waiting:
        eng.step()
    want = build(tmp_path / "fresh", ["r1"])[1].generate([40, 41], "r1", GREEDY).token_ids
    assert [h.result().token_ids for h in short] == [want, want] and eng.failed is None


@pytest.mark.parametrize("change", ["vanished", "changed"])
def test_evicted_adapter_whose_files_vanished_fails_its_request_not_the_engine(tmp_path, change):
    af = make_adapter(tmp_path / "probe", seed=1)
    one = sum(t.numel() for t in af.tensors.values()) * 4
    _, eng, store = build(tmp_path, ["r1", "r2"], budget=one)
    prompt = [70, 71, 72]
    want = eng.generate(prompt, "r1", GREEDY).token_ids
    eng.generate(prompt, "r2", GREEDY)  # evicts r1
    saved = tmp_path / "saved-r1"
    shutil.copytree(tmp_path / "r1", saved)
    if change == "vanished":
        shutil.rmtree(tmp_path / "r1")
    else:
        make_adapter(tmp_path / "r1", seed=42)
    res = eng.generate(prompt, "r1", GREEDY)
    assert isinstance(res.error, AdapterFileError) and res.finish_reason == "error"
    assert "r1" in store.broken and eng.failed is None
    assert eng.generate(prompt, "r2", GREEDY).finish_reason == "length"  # still serving
    shutil.rmtree(tmp_path / "r1", ignore_errors=True)
    shutil.copytree(saved, tmp_path / "r1")  # the files come back: the adapter serves again, unmarked
    assert eng.generate(prompt, "r1", GREEDY).token_ids == want and "r1" not in store.broken


def test_over_http_an_adapter_whose_files_vanished_is_a_4xx_and_listed_by_health(tmp_path):
    """The issue's steps: --memory-budget for one adapter, request r1 and r2, remove DIR/r1, request r1."""
    af = make_adapter(tmp_path / "r1", seed=1)
    make_adapter(tmp_path / "r2", seed=2)
    one = sum(t.numel() for t in af.tensors.values()) * 4
    server = Server(models.tiny_llama(seed=0), None, base_id="tiny-llama", adapters_dir=tmp_path,
                    config=EngineConfig(max_batch=2, max_prompt_tokens=16, max_new_tokens=8), memory_budget=one)
    loop = LoopbackServer(create_app(server)).start()
    try:
        with httpx.Client(base_url=loop.url, timeout=30) as h:
            for model in ["r1", "r2"]:
                assert h.post("/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 2}).status_code == 200
            shutil.rmtree(tmp_path / "r1")
            err = _is_error(h.post("/v1/completions", json={"model": "r1", "prompt": "x", "max_tokens": 2}), 400,
                            "invalid_adapter")
            assert "reloading adapter 'r1'" in err["message"]
            health = h.get("/health")
            assert health.status_code == 200 and list(health.json()["broken_adapters"]) == ["r1"]
            assert h.post("/v1/completions", json={"model": "r2", "prompt": "x", "max_tokens": 2}).status_code == 200
    finally:
        loop.stop()


# ---- start-up with broken adapters in the folder -------------------------------------------------------------
def _broken_folder(folder: Path) -> dict[str, str]:
    """A folder with one good adapter and one of each broken kind -> {name: expected error class name}."""
    make_adapter(folder / "good", seed=1)
    make_adapter(folder / "nan", seed=2)
    rewrite_adapter(folder / "nan", tensor=lambda t: t * math.nan)
    other = models.tiny_llama(seed=0, num_hidden_layers=3)
    import loraplex as lp

    lp.inject(other, lp.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), "a")
    lp.save_adapter(other, "a", folder / "otherbase")
    make_adapter(folder / "liar", seed=3, targets=["q_proj"])  # holds q_proj tensors, says it targets v_proj
    rewrite_adapter(folder / "liar", config={"target_modules": ["v_proj"]}, keep_hash=False)
    make_adapter(folder / "base", seed=4)  # the base's alias
    make_adapter(folder / "bad name", seed=5)
    return {"nan": "NonFiniteError", "otherbase": "BaseMismatchError", "liar": "AdapterFileError",
            "base": "AdapterExistsError", "bad name": "ConfigError"}


def test_broken_adapters_in_the_folder_are_skipped_and_reported(tmp_path):
    expect = _broken_folder(tmp_path)
    server = new_server(tmp_path)
    loop = LoopbackServer(create_app(server)).start()
    try:
        health = httpx.get(f"{loop.url}/health", timeout=30)
        assert health.status_code == 200 and health.json()["status"] == "ok"
        skipped = health.json()["skipped_adapters"]
        assert {k: v.split(":")[0] for k, v in skipped.items()} == expect
        assert "target_modules" in skipped["liar"]
        assert server.store.names() == ["good"]
        r = httpx.post(f"{loop.url}/v1/completions", json={"model": "good", "prompt": "x", "max_tokens": 2}, timeout=30)
        assert r.status_code == 200
        liar = zipped(tmp_path / "liar")  # the same adapter uploaded: refused, nothing installed
        err = _is_error(httpx.post(f"{loop.url}/v1/adapters", params={"name": "liar2"}, content=liar, timeout=30,
                                   headers={**ADMIN, "content-type": "application/zip"}), 400, "invalid_adapter")
        assert "target_modules" in err["message"] and not (tmp_path / "liar2").exists()
    finally:
        loop.stop()


def test_hidden_entries_in_the_folder_are_neither_served_nor_reported(tmp_path):
    """A hidden entry (an atomic write's temporary, an upload being unpacked) is not an adapter: the folder
    rule is runtime.AdapterStore's, so start-up neither loads it nor reports it as skipped."""
    make_adapter(tmp_path / "good", seed=1)
    shutil.copytree(tmp_path / "good", tmp_path / ".good.tmp-123-abcd")  # what an interrupted writer leaves
    server = new_server(tmp_path)
    assert server.store.load_all() == (["good"], {})
    assert server.store.available() == ["good"]


# ---- HTTP: uploads, names, text, sizes ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(tmp_path_factory, one_thread):
    with serving(tmp_path_factory.mktemp("adapters"), ["r1", "r2"]) as running:
        yield running


def _post(http: httpx.Client, path: str, body: dict, **kw) -> httpx.Response:
    """POST JSON as Python writes it (ASCII, lone surrogates as \\ud800 escapes, which JSON allows)."""
    return http.post(path, content=json.dumps(body), headers={"content-type": "application/json", **kw})


def _upload(http: httpx.Client, name: str, data: bytes, **params) -> httpx.Response:
    return http.post("/v1/adapters", params={"name": name, **params}, content=data,
                     headers={**ADMIN, "content-type": "application/zip"})


def test_upload_never_overwrites_files_it_was_not_told_to_replace(served, http, tmp_path):
    server, _ = served
    folder = server.store.directory
    make_adapter(tmp_path / "new", seed=30)
    assert http.delete("/v1/adapters/r2", headers=ADMIN).status_code == 200  # unloaded; DIR/r2 stays
    before = (folder / "r2" / "adapter_model.safetensors").read_bytes()
    err = _is_error(_upload(http, "r2", zipped(tmp_path / "new")), 409, "adapter_exists")
    assert "replace=true" in err["message"]
    assert (folder / "r2" / "adapter_model.safetensors").read_bytes() == before
    assert http.post("/v1/adapters", json={"name": "r2"}, headers=ADMIN).status_code == 200  # loads it as it is
    assert server.store.info("r2").content_hash != make_adapter(tmp_path / "x", seed=30).content_hash
    r = _upload(http, "r2", zipped(tmp_path / "new"), replace="true")  # asked for: replaced
    assert r.status_code == 200 and (folder / "r2" / "adapter_model.safetensors").read_bytes() != before


def _patch_central(data: bytes, offset: int, fmt: str, value: int, member: str = "adapter_config.json") -> bytes:
    """Overwrite a field of `member`'s central directory entry (`offset` from the entry's signature)."""
    at = data.index(b"PK\x01\x02")
    while data[at + 46: at + 46 + struct.unpack_from("<H", data, at + 28)[0]] != member.encode():
        at = data.index(b"PK\x01\x02", at + 4)
    return data[: at + offset] + struct.pack(fmt, value) + data[at + offset + struct.calcsize(fmt):]


def _corrupt_zips(directory: Path) -> dict[str, bytes]:
    stored = zipped(directory)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(directory.iterdir()):
            zf.write(f, f.name)
    deflated = buf.getvalue()
    with zipfile.ZipFile(io.BytesIO(deflated)) as zf:
        info = zf.getinfo("adapter_model.safetensors")
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)  # local header, then data
    mid = start + info.compress_size // 2
    size = zipfile.ZipFile(io.BytesIO(stored)).getinfo("adapter_config.json").file_size
    return {
        "bad crc": stored.replace(b'"lora_alpha"', b'"lora_alphb"'),
        "corrupt deflate": deflated[:mid] + b"\xff" * 64 + deflated[mid + 64:],
        "understated size": _patch_central(stored, 24, "<I", size // 2),
        "unknown method": _patch_central(stored, 10, "<H", 99),
        "encrypted flag": _patch_central(stored, 8, "<H", 1),
    }


def test_corrupt_zip_uploads_are_typed_errors(served, http):
    server, _ = served
    folder = server.store.directory
    for what, data in _corrupt_zips(folder / "r1").items():
        r = _upload(http, "corrupt", data)
        assert 400 <= r.status_code < 500, (what, r.status_code, r.text)
        assert not (folder / "corrupt").exists(), what
    assert http.get("/health").json()["status"] == "ok"


def test_names_are_checked_the_same_on_every_route(served, http, tmp_path):
    server, _ = served
    make_adapter(tmp_path / "n", seed=31)
    for name in ["u_newline\n", "r1\n", "a b", "\ud800"]:
        if name.isprintable() or "\n" in name:  # httpx cannot put a lone surrogate into a URL
            _is_error(_upload(http, name, zipped(tmp_path / "n")), 400)
        _is_error(_post(http, "/v1/adapters", {"name": name}, **ADMIN), 400)
        _is_error(_post(http, "/v1/completions", {"model": name, "prompt": "x"}), 400)
    _is_error(http.delete("/v1/adapters/r1%0A", headers=ADMIN), 400)
    listed = [m["id"] for m in http.get("/v1/models").json()["data"]]
    assert all("\n" not in n for n in listed) and not any("newline" in p.name for p in server.store.directory.iterdir())


def test_huge_seeds_and_lone_surrogates_are_bad_requests_not_500(http):
    base = {"model": "r1", "prompt": "x", "max_tokens": 2}
    for body in [{**base, "seed": 2**64}, {**base, "seed": -(2**63) - 1}, {**base, "seed": 10**30},
                 {**base, "prompt": "\ud800x"}, {**base, "model": "r1", "stop": ["\udfff"], "prompt": "\ud800"},
                 {**base, "temperature": 1e-300, "prompt": "\udc80"}]:
        _is_error(_post(http, "/v1/completions", body), 400)
    chat = {"model": "r1", "messages": [{"role": "user", "content": "hi \ud800"}], "max_tokens": 2}
    _is_error(_post(http, "/v1/chat/completions", chat), 400)
    for seed in [2**64 - 1, -(2**63), 0]:
        assert http.post("/v1/completions", json={**base, "seed": seed, "temperature": 1.0}).status_code == 200
    for t, p in [(1e-300, 1.0), (1e-45, 1e-300), (5e-324, 5e-324)]:  # tiny: greedy / the top token
        assert http.post("/v1/completions", json={**base, "temperature": t, "top_p": p}).status_code == 200
    assert http.get("/health").json()["status"] == "ok"


def test_a_huge_prompt_is_refused_by_size_before_tokenizing(served, http):
    server, _ = served
    with pytest.raises(RequestTooLargeError, match="bytes of text"):
        server.codec.encode("x" * 20_000_000, server.engine.config.max_prompt_tokens)
    err = _is_error(http.post("/v1/completions", json={"model": "r1", "prompt": "x" * 2_000_000}), 413)
    assert "max-prompt-tokens" in err["message"]
    err = _is_error(http.post("/v1/chat/completions", json={"model": "r1", "max_tokens": 2, "messages": [
        {"role": "user", "content": "y" * 2_000_000}]}), 413)


def test_tokenizing_runs_off_the_event_loop(tmp_path):
    """While one request's prompt is being tokenized, /health still answers: the tokenizer here waits until
    /health has answered (at most 20 s); on the event loop it would block /health until then."""
    server = new_server(tmp_path)
    entered, answered = threading.Event(), threading.Event()
    order: list[str] = []

    class WaitingTokenizer(ByteTokenizer):
        def encode(self, text: str) -> list[int]:
            entered.set()
            order.append("health first" if answered.wait(20) else "tokenizer first")
            return super().encode(text)

    server.codec.tokenizer = WaitingTokenizer(server.codec.tokenizer.vocab_size, server.codec.tokenizer.special)
    loop = LoopbackServer(create_app(server)).start()
    try:
        out: list[int] = []
        t = threading.Thread(target=lambda: out.append(httpx.post(
            f"{loop.url}/v1/completions", json={"model": "base", "prompt": "slow", "max_tokens": 2}, timeout=60
        ).status_code))
        t.start()
        assert entered.wait(30)
        health = httpx.get(f"{loop.url}/health", timeout=60)
        answered.set()
        t.join(60)
        assert health.status_code == 200 and order == ["health first"] and out == [200]
    finally:
        answered.set()
        loop.stop()


# ---- the command line ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags,word", [(["--port", "99999"], "--port"), (["--port", "-1"], "--port"),
                                        (["--timeout", "inf"], "--timeout"),
                                        (["--max-upload-mb", "nan"], "--max-upload-mb")])
def test_cli_refuses_unusable_flag_values(tmp_path, capsys, flags, word):
    code = cli.main(["serve", "--base", "tiny-llama", "--adapters", str(tmp_path), "--api-key", KEY, *flags])
    err = capsys.readouterr().err
    assert code == 2 and word in err and "Traceback" not in err  # a UsageError: exit 2, as argparse


def test_a_huge_body_is_refused_before_it_is_parsed(served, http):
    """A JSON body over the cap (millions of token ids) is 413 by its Content-Length or, streamed without one,
    as it arrives; nothing of it is parsed, and the server goes on answering."""
    from loraplex.serve.bodylimit import MAX_REQUEST_BYTES

    ids = ",".join(["1"] * (MAX_REQUEST_BYTES // 2 + 1))
    body = ('{"model": "r1", "max_tokens": 1, "prompt": [' + ids + "]}").encode()
    err = _is_error(http.post("/v1/completions", content=body, headers={"content-type": "application/json"}), 413)
    assert "request body" in err["message"]

    def chunked():  # no Content-Length: counted as it streams in
        for i in range(0, len(body), 1 << 20):
            yield body[i: i + (1 << 20)]
    err = _is_error(http.post("/v1/completions", content=chunked(), headers={"content-type": "application/json"}),
                    413)
    assert "request body" in err["message"]
    small = {"model": "r1", "prompt": [1, 2, 3], "max_tokens": 1}
    assert http.post("/v1/completions", json=small).status_code == 200
    assert http.get("/health").json()["status"] == "ok"
