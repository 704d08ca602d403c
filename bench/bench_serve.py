"""Serving benchmark on loopback: throughput and latency of `loraplex serve` under a bounded load.

Starts the server as a subprocess on a free 127.0.0.1 port, twice: the normal engine (continuous batching,
adapters mixed in one batch) and the naive baseline (--single-adapter-batches: a batch holds one adapter at
a time). N concurrent clients send R requests in all; request i names adapter i % K (K = 1, 16, 64) or the
base. Every request has the same prompt length and generates exactly --max-tokens tokens (ignore_eos), so
throughput = generated tokens / wall time. Prints one table and the ratio to the no-adapter run.

    .venv/bin/python bench/bench_serve.py                       # SmolLM2-135M, 16 clients, 64 r=8 adapters
    .venv/bin/python bench/bench_serve.py --base tiny-llama --requests 32   # a quick smoke run

The adapters are random (r=8 on every linear layer of every decoder layer), written in PEFT's format.

Then a fault test on the continuous server: clients keep sending greedy requests (half of them streamed) to
adapters a0..a3 and to "swap", while an admin client loads "churn" from the folder, replaces "swap" in place
by zip upload (two versions in turn) and unloads "churn", --fault-rounds times. Every answer must be a 200
whose text equals what that adapter (for "swap": one of its two versions) answers alone on an idle server.

--peer vllm (optional, never in `make test`): after loraplex's servers, starts vLLM's CPU server from its own
venv (bench/vllm_env.py: created on demand, a few GB the first time) on the same base directory and the same
adapters (--lora-modules; --max-loras = --max-batch, --max-num-seqs = --max-batch) and runs the same
workloads against it; prints loraplex continuous / vLLM tokens/s per workload.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import httpx

from loraplex.models import smollm2_path
from loraplex.report import format_table

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vllm_env  # noqa: E402  (bench/ is not a package)
from serve_load import free_port, load, loraplex_command, stop, token_prompts, wait_ready, write_adapters  # noqa: E402

ADMIN_KEY = "bench-admin-key"


class ServerProcess:
    def __init__(self, args: argparse.Namespace, folder: Path, naive: bool) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(loraplex_command(
            args.base, folder, self.port, max_batch=args.max_batch, max_tokens=args.max_tokens,
            prompt_tokens=args.prompt_tokens, queue_size=args.requests + 8, threads=args.threads,
            num_layers=args.num_layers,
            extra=["--api-key", ADMIN_KEY] + (["--single-adapter-batches"] if naive else [])))
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 600) -> None:
        wait_ready(self.proc, self.url, "/health", timeout)

    def stop(self) -> None:
        stop(self.proc)


class VllmProcess(ServerProcess):
    """vLLM's OpenAI server (CPU, fp32) over the same base directory, with adapters a0..a{K-1} as LoRAs."""

    def __init__(self, args: argparse.Namespace, folder: Path, adapters: int) -> None:
        base_dir = smollm2_path() if args.base == "smollm2" else Path(args.base)
        if args.num_layers or not (base_dir / "config.json").is_file():
            raise SystemExit(f"--peer vllm needs --base to be a transformers directory with a tokenizer (or "
                             f"'smollm2') and no --num-layers; got --base {args.base!r}")
        self.port = free_port()
        names = {f"a{i}": folder / f"a{i}" for i in range(adapters)}
        cmd = vllm_env.server_command(base_dir, names, self.port, args.vllm_venv, args.rank) + [
            "--served-model-name", "base", "--max-loras", str(min(adapters, args.max_batch)),
            "--max-cpu-loras", str(max(adapters, 1)), "--max-num-seqs", str(args.max_batch),
            "--max-model-len", str(args.prompt_tokens + args.max_tokens + 64)]
        self.proc = subprocess.Popen(cmd, env=vllm_env.server_env(args.vllm_venv), stdout=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"


def zipped(directory: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in sorted(directory.iterdir()):
            zf.write(f, f.name)
    return buf.getvalue()


async def answer(c: httpx.AsyncClient, model: str, prompt: list[int], max_tokens: int, stream: bool) -> str:
    """The greedy completion's text; raises on any HTTP error or error event."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    if not stream:
        r = await c.post("/v1/completions", json=body)
        r.raise_for_status()
        return r.json()["choices"][0]["text"]
    parts = []
    async with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return "".join(parts)
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"error event: {event['error']}")
            parts.append(event["choices"][0]["text"])
    raise RuntimeError("the stream ended without [DONE]")


async def fault_test(url: str, folder: Path, versions: list[Path], args: argparse.Namespace,
                     vocab: int) -> dict[str, int]:
    """See the module docstring; returns the counts of requests, admin calls and failures."""
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    prompt = [(7 * j) % min(vocab - 3, 500) + 3 for j in range(args.prompt_tokens)]
    steady = ["a0", "a1", "a2", "a3"]
    counts = {"requests": 0, "streamed": 0, "admin calls": 0, "failed": 0, "wrong": 0}
    failures: list[str] = []
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout) as c:

        async def upload(v: int) -> None:
            r = await c.post("/v1/adapters", params={"name": "swap", "replace": "true"}, content=zipped(versions[v]),
                             headers={**admin, "content-type": "application/zip"})
            r.raise_for_status()

        want: dict[str, set[str]] = {"swap": set()}
        for v in (1, 0):  # both versions' answers alone; the test starts on version 0
            await upload(v)
            want["swap"].add(await answer(c, "swap", prompt, args.fault_tokens, False))
        for m in steady:
            want[m] = {await answer(c, m, prompt, args.fault_tokens, False)}
        if len(want["swap"]) != 2:
            raise RuntimeError("the two versions of 'swap' answer alike; the test could not tell them apart")

        async def client(j: int) -> None:
            for i in range(args.fault_requests):
                model = (steady + ["swap", "swap"])[(i + j) % 6]
                stream = (i + j) % 2 == 1
                counts["requests"] += 1
                counts["streamed"] += stream
                try:
                    text = await answer(c, model, prompt, args.fault_tokens, stream)
                except (httpx.HTTPError, RuntimeError) as exc:
                    counts["failed"] += 1
                    failures.append(f"{model}: {exc!r}")
                    continue
                if text not in want[model]:
                    counts["wrong"] += 1
                    failures.append(f"{model}: unexpected text {text!r}")

        async def churn() -> None:
            for i in range(args.fault_rounds):
                for call in (lambda: c.post("/v1/adapters", json={"name": "churn"}, headers=admin),
                             lambda: c.post("/v1/adapters", params={"name": "swap", "replace": "true"},
                                            content=zipped(versions[(i + 1) % 2]),
                                            headers={**admin, "content-type": "application/zip"}),
                             lambda: c.delete("/v1/adapters/churn", headers=admin)):
                    counts["admin calls"] += 1
                    r = await call()
                    if r.status_code != 200:
                        counts["failed"] += 1
                        failures.append(f"admin round {i}: {r.status_code} {r.text[:200]}")
                await asyncio.sleep(0.2)

        await asyncio.wait_for(asyncio.gather(churn(), *(client(j) for j in range(args.fault_clients))),
                               args.timeout)
    for f in failures[:10]:
        print("  FAULT", f, flush=True)
    return counts


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
    ap.add_argument("--threads", type=int, default=1,
                    help="server torch threads (default 1: on a shared, busy box 2 OpenMP threads spin at every "
                         "barrier and a decode step ran ~7x slower, measured with SmolLM2 on 2 loaded cores)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per workload before giving up")
    ap.add_argument("--fault-clients", type=int, default=4, help="fault test: concurrent clients")
    ap.add_argument("--fault-requests", type=int, default=6, help="fault test: requests per client")
    ap.add_argument("--fault-tokens", type=int, default=12, help="fault test: tokens per request")
    ap.add_argument("--fault-rounds", type=int, default=6, help="fault test: load/replace/unload rounds (0 = skip)")
    ap.add_argument("--peer", choices=["vllm"], help="also run the workloads against this peer (see the docstring)")
    ap.add_argument("--vllm-venv", type=Path, default=vllm_env.DEFAULT_VENV, help="the vLLM peer's venv")
    args = ap.parse_args()
    ks = [int(k) for k in args.adapters.split(",")]
    base_id = "base"
    rows, results, faults = [], {}, None
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "adapters"
        vocab = write_adapters(args.base, args.num_layers, args.rank, {folder / f"a{i}": 0.01 for i in range(max(ks))})
        prompts = token_prompts(args.requests, args.prompt_tokens, vocab)
        # the fault test's extras: "churn" in the folder (loaded by name), two versions of "swap" to upload, made
        # to move greedy output clearly so that a wrong version shows
        versions = [Path(tmp) / "swap-v1", Path(tmp) / "swap-v2"]
        write_adapters(args.base, args.num_layers, args.rank, {folder / "churn": 0.01, **{v: 0.2 for v in versions}},
                       seed=1)
        # (label, naive: --single-adapter-batches, or None for the vLLM peer, workloads)
        plan = [("continuous", False, ["base"] + ks), ("naive: one adapter per batch", True, [k for k in ks if k > 1])]
        if args.peer == "vllm":
            vllm_env.ensure(args.vllm_venv)
            plan.append(("vllm", None, ["base"] + ks))
        for label, naive, workloads in plan:
            if not workloads:
                continue
            server = VllmProcess(args, folder, max(ks)) if naive is None else ServerProcess(args, folder, bool(naive))
            try:
                server.wait_ready()
                if naive is False:  # "churn" is loaded by name during the fault test, not at start
                    assert httpx.delete(f"{server.url}/v1/adapters/churn", headers={
                        "Authorization": f"Bearer {ADMIN_KEY}"}).status_code == 200
                # warm-up: a few requests so first-call costs stay out of the numbers
                asyncio.run(load(server.url, [base_id, "a0"] * 2, prompts, 2, 4, args.timeout))
                for w in workloads:
                    models = [base_id] * args.requests if w == "base" else [f"a{i % w}" for i in range(args.requests)]
                    done = asyncio.run(load(server.url, models, prompts, args.clients, args.max_tokens, args.timeout))
                    wall, lat, tokens = done.wall, done.latencies, done.tokens
                    tps = tokens / wall
                    results[(label, w)] = tps
                    q = statistics.quantiles(lat, n=100, method="inclusive")
                    rows.append([label, "none (base)" if w == "base" else w, args.requests, f"{tps:.1f}",
                                 f"{statistics.median(lat):.2f}", f"{q[98]:.2f}"])
                    print(f"  {label:<28} K={w!s:<5} {tps:8.1f} tok/s  p50 {statistics.median(lat):.2f}s "
                          f"p99 {q[98]:.2f}s", flush=True)
                if naive is False and args.fault_rounds:
                    t0 = time.perf_counter()
                    faults = asyncio.run(fault_test(server.url, folder, versions, args, vocab))
                    faults["seconds"] = round(time.perf_counter() - t0)
                    print(f"  fault test: {faults}", flush=True)
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
    if args.peer == "vllm":
        peer = [["none (base)" if w == "base" else w, f"{results[('continuous', w)]:.1f}", f"{results[('vllm', w)]:.1f}",
                 f"{results[('continuous', w)] / results[('vllm', w)]:.2f}x"] for w in ["base"] + ks]
        print(f"\nloraplex serve (continuous, {args.threads} torch threads) vs vLLM {vllm_env.VLLM} (CPU, fp32, "
              f"OpenMP on {vllm_env.server_env(args.vllm_venv)['VLLM_CPU_OMP_THREADS_BIND']}), same requests:")
        print(format_table(peer, ["adapters (K)", "loraplex tok/s", "vLLM tok/s", "loraplex / vLLM"]))
    if faults is not None:
        print(f"\nfault test ({args.fault_clients} clients x {args.fault_requests} requests x {args.fault_tokens} "
              f"tokens, {args.fault_rounds} rounds of load 'churn' / replace 'swap' by upload / unload 'churn'): "
              f"{faults['requests']} requests ({faults['streamed']} streamed), {faults['admin calls']} admin calls, "
              f"{faults['failed']} failed, {faults['wrong']} wrong, {faults['seconds']} s")
        return 1 if faults["failed"] or faults["wrong"] else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
