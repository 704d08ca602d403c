"""Pieces the serving benchmarks share (bench_serve.py, bench_peer.py, check_vllm.py): random PEFT adapters, the
`loraplex serve` command line, starting/stopping a server process, the load generator, a process tree's CPU time.

The load: request i sends prompts[i] to models[i] (greedy, ignore_eos, exactly max_tokens generated) with
`clients` requests in flight; streamed requests also time their first content chunk (TTFT).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import httpx
import torch
from safetensors.torch import save_file

from loraplex.config import LoraConfig
from loraplex.models import load_base

PROJ = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


def write_adapters(base: str, num_layers: int | None, rank: int, dirs: dict[Path, float], seed: int = 0) -> int:
    """A random adapter for `base` in each directory (PEFT keys, no loraplex metadata), B drawn with std
    dirs[d] (the larger, the more it moves the output); returns the base's vocab size."""
    model, _ = load_base(base, num_layers=num_layers)
    shapes = {name: m.weight.shape for name, m in model.named_modules()
              if name.split(".")[-1] in PROJ["self_attn"] + PROJ["mlp"]}
    g = torch.Generator().manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(PROJ["self_attn"] + PROJ["mlp"])).to_dict()
    for d, std in dirs.items():
        tensors = {}
        for name, (fout, fin) in shapes.items():
            tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rank, fin, generator=g) / fin**0.5
            tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(fout, rank, generator=g) * std
        d.mkdir(parents=True)
        save_file(tensors, str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(json.dumps(config))
    return model.config.vocab_size


def token_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """n prompts of `length` token ids drawn uniformly from [3, vocab) (seeded: every server gets the same)."""
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loraplex_command(base: str, folder: Path, port: int, *, max_batch: int, max_tokens: int, prompt_tokens: int,
                     queue_size: int, threads: int, num_layers: Optional[int] = None, dtype: Optional[str] = None,
                     extra: Sequence[str] = ()) -> list[str]:
    """`loraplex serve` on 127.0.0.1:port over `base` with the adapters in `folder` (base check off); `extra`
    flags are appended."""
    cmd = [sys.executable, "-m", "loraplex", "serve", "--base", base, "--adapters", str(folder),
           "--host", "127.0.0.1", "--port", str(port), "--max-batch", str(max_batch),
           "--max-new-tokens", str(max_tokens), "--max-prompt-tokens", str(prompt_tokens),
           "--queue-size", str(queue_size), "--timeout", "900", "--log-level", "warning",
           "--no-check-base", "--threads", str(threads)]
    cmd += ["--dtype", dtype] if dtype else []  # None: the server's default
    return cmd + (["--num-layers", str(num_layers)] if num_layers else []) + list(extra)


def wait_ready(proc: subprocess.Popen, url: str, path: str, timeout: float, poll: float = 0.5) -> None:
    """Return once GET url+path answers 200; raise when the process exits first or `timeout` s pass."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with {proc.returncode}")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(poll)
    raise RuntimeError(f"{url}: not ready after {timeout:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM (uvicorn and vLLM shut down gracefully on it), SIGKILL after 60 s."""
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of `pid` and its live descendants (Linux /proc; vLLM runs its engine in
    child processes), plus the children they have already reaped."""
    parent: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # exited meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid ...
        parent[int(entry)] = int(fields[1])
        ticks[int(entry)] = sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    tree, frontier = {pid}, [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p and c not in tree]
        tree.update(kids)
        frontier += kids
    return sum(ticks.get(p, 0) for p in tree) / os.sysconf("SC_CLK_TCK")


def add_sampling_flags(ap: argparse.ArgumentParser) -> None:
    """--temperature / --top-p for the timed requests (see `sampling`)."""
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="the timed requests' temperature (default 0: greedy; identity checks stay greedy)")
    ap.add_argument("--top-p", type=float, default=1.0, help="the timed requests' top_p, with --temperature > 0")


def sampling(ap: argparse.ArgumentParser, args: argparse.Namespace) -> Optional[dict]:
    """The timed requests' sampling fields from `add_sampling_flags`' flags: None (greedy) at --temperature 0;
    a --top-p with greedy requests is refused."""
    if not 0 <= args.temperature <= 100:  # NaN fails too
        ap.error(f"--temperature must be in [0, 100] (0 = greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        ap.error(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_p != 1.0 and args.temperature == 0:
        ap.error(f"--top-p {args.top_p} needs --temperature > 0 (at 0 the requests are greedy)")
    return {"temperature": args.temperature, "top_p": args.top_p} if args.temperature > 0 else None


@dataclass
class LoadResult:
    wall: float  # s, first request sent to last answer
    latencies: list[float]  # s per request, in completion order
    ttfts: list[float]  # s to the first non-empty text chunk, streamed requests only
    tokens: int  # completion tokens, from the answers' usage


async def load(url: str, models: Sequence[str], prompts: Sequence[list[int]], clients: int, max_tokens: int,
               timeout: float, stream: bool = False, sampling: Optional[dict] = None) -> LoadResult:
    """Send request i = (models[i], prompts[i]) for every i with `clients` in flight (see the module doc);
    greedy unless `sampling` gives other request fields (e.g. {"temperature": 1.0, "top_p": 0.95})."""
    todo = list(range(len(models)))
    res = LoadResult(0.0, [], [], 0)

    async def one(c: httpx.AsyncClient, i: int) -> None:
        body = {"model": models[i], "prompt": prompts[i], "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, **(sampling or {})}
        t0 = time.perf_counter()
        if not stream:
            r = await c.post("/v1/completions", json=body)
            r.raise_for_status()
            res.latencies.append(time.perf_counter() - t0)
            res.tokens += r.json()["usage"]["completion_tokens"]
            return
        body.update(stream=True, stream_options={"include_usage": True})
        first, tokens = None, None
        async with c.stream("POST", "/v1/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    break
                event = json.loads(line[6:])
                if "error" in event:
                    raise RuntimeError(f"{models[i]}: error event {event['error']}")
                if first is None and any(ch.get("text") for ch in event.get("choices") or ()):
                    first = time.perf_counter() - t0
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
            else:
                raise RuntimeError(f"{models[i]}: the stream ended without [DONE]")
        if tokens is None:
            raise RuntimeError(f"{models[i]}: the stream carried no usage chunk (stream_options.include_usage)")
        res.latencies.append(time.perf_counter() - t0)
        res.tokens += tokens
        if first is not None:
            res.ttfts.append(first)

    async def client(c: httpx.AsyncClient) -> None:
        while todo:
            await one(c, todo.pop(0))

    async with httpx.AsyncClient(base_url=url, timeout=timeout) as c:
        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(client(c) for _ in range(clients))), timeout)
        res.wall = time.perf_counter() - t0
    return res
