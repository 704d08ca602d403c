"""Serving benchmark on loopback: throughput and latency of `loraplex serve` under a bounded load.

Starts the server as a subprocess on a free 127.0.0.1 port, twice: the normal engine (continuous batching,
adapters mixed in one batch) and the naive baseline (--single-adapter-batches: a batch holds one adapter at
a time). N concurrent clients send R requests in all; request i names adapter i % K (K = 1, 16, 64) or the
base. Every request has the same prompt length and generates exactly --max-tokens tokens (ignore_eos), so
throughput = generated tokens / wall time. Prints one table and the ratio to the no-adapter run.

    .venv/bin/python bench/bench_serve.py                       # SmolLM2-135M, 16 clients, 64 r=8 adapters
    .venv/bin/python bench/bench_serve.py --base tiny-llama --requests 32   # a quick smoke run

The adapters are random (r=8 on every linear layer of every decoder layer), written in PEFT's format.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from safetensors.torch import save_file

from loraplex.config import LoraConfig
from loraplex.models import load_base
from loraplex.report import format_table

PROJ = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


def write_adapters(base: str, num_layers: int | None, k: int, rank: int, folder: Path) -> int:
    """k random adapters a0..a{k-1} for `base` (PEFT keys, no loraplex metadata); returns the vocab size."""
    model, _ = load_base(base, num_layers=num_layers)
    shapes = {name: m.weight.shape for name, m in model.named_modules()
              if name.split(".")[-1] in PROJ["self_attn"] + PROJ["mlp"]}
    g = torch.Generator().manual_seed(0)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(PROJ["self_attn"] + PROJ["mlp"])).to_dict()
    for i in range(k):
        tensors = {}
        for name, (fout, fin) in shapes.items():
            tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rank, fin, generator=g) / fin**0.5
            tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(fout, rank, generator=g) * 0.01
        d = folder / f"a{i}"
        d.mkdir(parents=True)
        save_file(tensors, str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(json.dumps(config))
    return model.config.vocab_size


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, args: argparse.Namespace, folder: Path, naive: bool) -> None:
        self.port = free_port()
        cmd = [sys.executable, "-m", "loraplex", "serve", "--base", args.base, "--adapters", str(folder),
               "--host", "127.0.0.1", "--port", str(self.port), "--max-batch", str(args.max_batch),
               "--max-new-tokens", str(args.max_tokens), "--max-prompt-tokens", str(args.prompt_tokens),
               "--queue-size", str(args.requests + 8), "--timeout", "900", "--log-level", "warning",
               "--no-check-base", "--threads", str(args.threads)]
        if args.num_layers:
            cmd += ["--num-layers", str(args.num_layers)]
        if naive:
            cmd.append("--single-adapter-batches")
        self.proc = subprocess.Popen(cmd)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 600) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError("the server did not become ready")

    def stop(self) -> None:
        self.proc.terminate()  # uvicorn shuts down gracefully on SIGTERM
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def load(url: str, models: list[str], clients: int, prompt_tokens: int, max_tokens: int,
               timeout: float, vocab: int) -> tuple[float, list[float], int]:
    """Send len(models) requests with `clients` in flight; returns (wall s, latencies s, tokens generated)."""
    todo = list(enumerate(models))
    lat: list[float] = []
    tokens = 0

    async def client(c: httpx.AsyncClient) -> None:
        nonlocal tokens
        while todo:
            i, model = todo.pop(0)
            prompt = [(17 * i + 5 * j) % min(vocab - 3, 500) + 3 for j in range(prompt_tokens)]
            t0 = time.perf_counter()
            r = await c.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                                      "temperature": 0, "ignore_eos": True})
            r.raise_for_status()
            lat.append(time.perf_counter() - t0)
            tokens += r.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(base_url=url, timeout=timeout) as c:
        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(client(c) for _ in range(clients))), timeout)
        return time.perf_counter() - t0, lat, tokens


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="smollm2")
    ap.add_argument("--num-layers", type=int)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=48, help="requests per workload")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--adapters", default="1,16,64", help="K values (distinct adapters in a workload)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=900, help="seconds per workload before giving up")
    args = ap.parse_args()
    ks = [int(k) for k in args.adapters.split(",")]
    base_id = "base"
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "adapters"
        vocab = write_adapters(args.base, args.num_layers, max(ks), args.rank, folder)
        plan = [("continuous", False, ["base"] + ks), ("naive: one adapter per batch", True, [k for k in ks if k > 1])]
        for label, naive, workloads in plan:
            if not workloads:
                continue
            server = ServerProcess(args, folder, naive)
            try:
                server.wait_ready()
                # warm-up: a few requests so first-call costs stay out of the numbers
                asyncio.run(load(server.url, [base_id, "a0"] * 2, 2, args.prompt_tokens, 4, args.timeout, vocab))
                for w in workloads:
                    models = [base_id] * args.requests if w == "base" else [f"a{i % w}" for i in range(args.requests)]
                    wall, lat, tokens = asyncio.run(load(server.url, models, args.clients, args.prompt_tokens,
                                                         args.max_tokens, args.timeout, vocab))
                    tps = tokens / wall
                    results[(label, w)] = tps
                    q = statistics.quantiles(lat, n=100, method="inclusive")
                    rows.append([label, "none (base)" if w == "base" else w, args.requests, f"{tps:.1f}",
                                 f"{statistics.median(lat):.2f}", f"{q[98]:.2f}"])
                    print(f"  {label:<28} K={w!s:<5} {tps:8.1f} tok/s  p50 {statistics.median(lat):.2f}s "
                          f"p99 {q[98]:.2f}s", flush=True)
            finally:
                server.stop()
    ref = results[("continuous", "base")]
    for r in rows:
        r.append(f"{float(r[3]) / ref:.2f}x")
    print()
    print(f"base {args.base}{f' ({args.num_layers} layers)' if args.num_layers else ''}, {args.clients} clients, "
          f"{args.requests} requests x {args.max_tokens} tokens, prompt {args.prompt_tokens} tokens, r={args.rank} "
          f"all-linear adapters, --max-batch {args.max_batch}, {args.threads} torch threads, {os.cpu_count()} CPUs")
    print(format_table(rows, ["server", "adapters (K)", "requests", "tokens/s", "p50 s", "p99 s", "vs no adapter"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
