"""Helpers shared by the serve tests: random adapters on the tiny Llama, a server on a loopback port.

`make_adapter(dir, seed)` injects an r=4 all-linear adapter with random A and B into tiny_llama(seed=0)
(B scaled so the adapter visibly changes greedy output) and saves it in PEFT's format.
`rewrite_adapter(dir, ...)` edits a saved adapter in place (tensors, config keys, the recorded content hash)
to make the broken files a hostile user would send.
`LoopbackServer` runs uvicorn in a thread on a free 127.0.0.1 port; `stop()` asks it to exit (graceful).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import uvicorn
from safetensors import safe_open
from safetensors.torch import save_file

import loraplex as lp
from loraplex import models


def make_adapter(directory: Path, seed: int, *, r: int = 4, targets="all-linear", gain: float = 3.0,
                 base_seed: int = 0) -> lp.AdapterFile:
    model = models.tiny_llama(seed=base_seed)
    lp.inject(model, lp.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False),
              "a", seed=seed)
    with torch.no_grad():
        for _, layer in lp.lora_layers(model):
            layer.lora_B["a"].weight.mul_(gain)
    return lp.save_adapter(model, "a", directory, base_name="tiny-llama", overwrite=True)  # tests rewrite in place


def rewrite_adapter(directory: Path, *, tensor: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    config: dict | None = None, keep_hash: bool = True) -> None:
    """Rewrite DIR's files: `tensor` maps every tensor, `config` updates adapter_config.json keys, and
    keep_hash=False drops the recorded content hash (a PEFT-written file has none)."""
    weights = directory / lp.store.WEIGHTS_NAME
    with safe_open(str(weights), framework="pt") as fh:
        tensors, meta = {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})
    if tensor is not None:
        tensors = {k: tensor(t) for k, t in tensors.items()}
    if not keep_hash:
        meta.pop("loraplex.content_hash", None)
    save_file(tensors, str(weights), metadata=meta)
    if config:
        path = directory / lp.store.CONFIG_NAME
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))


class LoopbackServer:
    def __init__(self, app, *, graceful_s: int = 30) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=graceful_s))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self, timeout: float = 30.0) -> LoopbackServer:
        self.thread.start()
        end = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > end or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()
