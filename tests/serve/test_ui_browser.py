"""The /ui page in a real headless browser (Debian's chromium), against a live server on loopback: the adapter
table shows rank, hash and eval metrics; the playground's side-by-side answers equal the API's. The
screenshot goes to artifacts/ui.png (or $LORAPLEX_ARTIFACTS/ui.png). Skipped where chromium is not installed."""

from __future__ import annotations

import html
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

import httpx
import pytest

import loraplex as lp
from loraplex.workflows.evaluate import BASE, EvalResult
from loraplex.models import tiny_llama

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs a chromium binary (apt-get install chromium)")
NAMES = ("alpha", "beta")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """`create_app` under uvicorn on 127.0.0.1: tiny-llama, two adapters, and eval results (given as `--results`
    does) for alpha only."""
    import uvicorn

    from loraplex.serve import EngineConfig
    from loraplex.serve.app import Server, create_app

    root = tmp_path_factory.mktemp("ui")
    results = tmp_path_factory.mktemp("eval") / "results.json"
    hashes = {}
    for i, name in enumerate(NAMES):
        model = tiny_llama(seed=0)
        lp.inject(model, lp.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
                  name, seed=i)
        hashes[name] = lp.save_adapter(model, name, root / name).content_hash
    scores = {BASE: {"loss": 4.5, "accuracy": 0.125}, "alpha": {"loss": 4.25, "accuracy": 0.25}}
    EvalResult("tiny-llama", "qa.jsonl", ["loss", "accuracy"], scores,
               {"alpha": {"content_hash": hashes["alpha"], "r": 4}}, 8, 64, 0).save(results)
    server = Server(tiny_llama(seed=0), None, base_id="tiny-llama", adapters_dir=root,
                    config=EngineConfig(max_prompt_tokens=64, max_new_tokens=32))
    app = create_app(server, results=results)
    port = _free_port()
    web = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    else:
        pytest.fail("the server did not come up")
    yield url, hashes
    web.should_exit = True
    thread.join(timeout=30)


def _chromium(*args: str) -> str:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", "--virtual-time-budget=60000", "--window-size=1280,900", *args]
    done = subprocess.run(cmd, capture_output=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:].decode(errors="replace")
    return done.stdout.decode("utf-8")  # bytes decoded by hand: text mode would turn a generated \r into \n


def _text(fragment: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", " ", fragment))


def test_page_in_a_headless_browser(live):
    url, hashes = live
    prompt = "Hello there"
    expected = {}
    for model in ("tiny-llama", *NAMES):  # what the API answers, to compare with the page's cards
        body = {"model": model, "prompt": prompt, "max_tokens": 6, "temperature": 0}
        expected[model] = httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
    page = f"{url}/ui?" + urlencode({"prompt": prompt, "max_tokens": 6, "models": "base,alpha,beta", "run": 1})
    dom = _chromium("--dump-dom", page)
    assert 'data-state="done"' in dom, dom[-3000:]
    for name in NAMES:  # the adapter table: one row each, with its hash; alpha's metrics, beta has none
        row = re.search(rf'<tr data-adapter="{name}">(.*?)</tr>', dom, re.S)
        assert row and hashes[name][:12] in row.group(1)
    alpha = _text(re.search(r'<tr data-adapter="alpha">(.*?)</tr>', dom, re.S).group(1)).split()
    assert alpha[:3] == ["alpha", "4", "14"] and "4.2500" in alpha and "25.0%" in alpha
    assert alpha[-4:-2] == ["1", "6"]  # served so far (read before the playground ran): 1 request, 6 tokens
    assert "4.5000" in _text(re.search(r'<tr data-adapter="tiny-llama">(.*?)</tr>', dom, re.S).group(1))
    for model, text in expected.items():  # side by side: one card per model, the same greedy text as the API
        card = re.search(rf'<div class="card" data-model="{model}">(.*?)</div></div>', dom, re.S)
        assert card, f"no card for {model}"
        pre = re.search(r"<pre>(.*?)</pre>", card.group(1), re.S)
        assert pre and html.unescape(pre.group(1)) == text, (model, pre and pre.group(1), text)
    artifacts = Path(os.environ.get("LORAPLEX_ARTIFACTS", Path(__file__).resolve().parents[2] / "artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    shot = artifacts / "ui.png"
    shot.unlink(missing_ok=True)
    _chromium(f"--screenshot={shot}", page)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
