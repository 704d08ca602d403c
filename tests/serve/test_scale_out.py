"""Scaling out: two `loraplex serve` replicas behind Debian's haproxy with examples/haproxy.cfg (the config
docs/serving.md shows): every request for one model lands on one replica (adapter affinity, hashed on the
body's `model` field), and the answers are the ones the replica gives directly. Skips without haproxy."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from loraplex import models  # noqa: E402
from loraplex.serve.app import Server, create_app  # noqa: E402
from loraplex.serve.engine import EngineConfig  # noqa: E402

from serve_helpers import LoopbackServer, make_adapter  # noqa: E402

CONFIG = Path(__file__).resolve().parents[2] / "examples" / "haproxy.cfg"
HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)
NAMES = ["a0", "a1", "a2", "a3", "a4", "a5"]

pytestmark = [pytest.mark.skipif(HAPROXY is None, reason="haproxy not installed (apt-get install haproxy)"),
              pytest.mark.usefixtures("one_thread")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def balanced(tmp_path_factory, one_thread):
    folder = tmp_path_factory.mktemp("adapters")
    for i, name in enumerate(NAMES):
        make_adapter(folder / name, seed=i + 1)
    config = EngineConfig(max_batch=4, max_queue=16, max_prompt_tokens=64, max_new_tokens=16)
    replicas = [LoopbackServer(create_app(Server(models.tiny_llama(seed=0), None, base_id="tiny-llama",
                                                 adapters_dir=folder, config=config))).start() for _ in range(2)]
    port = free_port()
    env = {**os.environ, "LB_BIND": f"127.0.0.1:{port}", "REPLICA1": f"127.0.0.1:{replicas[0].port}",
           "REPLICA2": f"127.0.0.1:{replicas[1].port}"}
    proxy = subprocess.Popen([HAPROXY, "-f", str(CONFIG), "-db"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proxy.poll() is None, proxy.stdout.read()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "haproxy did not listen within 20 s"
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}", {"r1": replicas[0].url, "r2": replicas[1].url}
    finally:
        proxy.terminate()
        proxy.wait(10)
        for r in replicas:
            r.stop()


def complete(url: str, model: str) -> httpx.Response:
    body = {"model": model, "prompt": "Hello", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=30)


def test_each_model_sticks_to_one_replica(balanced):
    lb, replicas = balanced
    served: dict[str, set[str]] = {}
    for _ in range(3):  # 7 models a round: a round robin would alternate each model's replica
        for model in [*NAMES, "a0:0.5+a1:0.5"]:
            r = complete(lb, model)
            assert r.status_code == 200, r.text
            served.setdefault(model, set()).add(r.headers["X-Loraplex-Replica"])
            direct = complete(replicas[r.headers["X-Loraplex-Replica"]], model)
            assert r.json()["choices"][0]["text"] == direct.json()["choices"][0]["text"]
    assert all(len(s) == 1 for s in served.values()), served  # affinity: one replica per model
    assert httpx.get(f"{lb}/v1/models", timeout=30).status_code == 200  # no model field: any replica
