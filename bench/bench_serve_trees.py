"""`loraplex serve` from several source trees on the same load, interleaved: tokens/s and time to first token, as
paired ratios to the first tree (e.g. main's checkout against a branch's worktree).

One server per tree (PYTHONPATH=<tree>/src, SmolLM2-135M, random r=8 all-linear adapters a0..a15 written once),
started together; only the one being measured runs (the others are SIGSTOPped). Each round visits the trees in
turn (the order reversed every other round) and runs, per workload K (base = no adapter, or K distinct adapters,
request i naming a{i % K}), the bench_serve.py load twice: --clients concurrent clients, --requests requests of
--max-tokens greedy tokens (or --temperature / --top-p sampled; ignore_eos), not streamed (tokens/s) and streamed
(tokens/s, median TTFT).
Printed: every measurement, then per workload and tree the medians, and the median [min-max] over rounds of the
paired ratio tree / first tree of the non-streamed tokens/s.

    flock /tmp/loraplex-bench.lock .venv/bin/python bench/bench_serve_trees.py /work/main /work/wt/branch \
        [--rounds 4] [--threads 2] [--workloads base,16]

A tree may carry extra `loraplex serve` flags after "::", to compare flag values on one tree:
    bench/bench_serve_trees.py . ".::--max-prefill-tokens 4096" --clients 64 --requests 128 --max-batch 64
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import (add_sampling_flags, free_port, load, loraplex_command, sampling, stop,  # noqa: E402
                        token_prompts, wait_ready, write_adapters)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trees", nargs="+", help="source trees (each has src/loraplex), each optionally followed by "
                    "'::' and extra serve flags; ratios are to the first")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2, help="server torch threads")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--workloads", default="base,16", help="comma-separated: base, or a number K of adapters")
    add_sampling_flags(ap)
    args = ap.parse_args()
    fields = sampling(ap, args)
    workloads = args.workloads.split(",")
    n_adapters = max([int(w) for w in workloads if w != "base"], default=1)
    res: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "adapters"
        vocab = write_adapters("smollm2", None, 8, {folder / f"a{i}": 0.01 for i in range(n_adapters)})
        prompts = token_prompts(args.requests, args.prompt_tokens, vocab)
        servers = {}
        for tree in args.trees:
            port = free_port()
            src, _, flags = tree.partition("::")
            cmd = loraplex_command("smollm2", folder, port, max_batch=args.max_batch, max_tokens=args.max_tokens,
                                   prompt_tokens=args.prompt_tokens, queue_size=args.requests + 8,
                                   threads=args.threads, extra=shlex.split(flags))
            proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONPATH=str(Path(src) / "src")),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            servers[tree] = (proc, f"http://127.0.0.1:{port}")
        try:
            for proc, url in servers.values():
                wait_ready(proc, url, "/health", 600)
                asyncio.run(load(url, ["base", "a0"] * 2, prompts, 2, 4, 600))  # warm-up
                proc.send_signal(signal.SIGSTOP)
            for rnd in range(args.rounds):
                for tree in args.trees if rnd % 2 == 0 else args.trees[::-1]:
                    proc, url = servers[tree]
                    proc.send_signal(signal.SIGCONT)
                    for w in workloads:
                        models = ["base"] * args.requests if w == "base" else \
                            [f"a{i % int(w)}" for i in range(args.requests)]
                        plain = asyncio.run(load(url, models, prompts, args.clients, args.max_tokens, 600,
                                                 sampling=fields))
                        streamed = asyncio.run(load(url, models, prompts, args.clients, args.max_tokens, 600,
                                                    stream=True, sampling=fields))
                        r = (plain.tokens / plain.wall, streamed.tokens / streamed.wall,
                             statistics.median(streamed.ttfts))
                        res.setdefault((tree, w), []).append(r)
                        print(f"round {rnd} {tree:<24} K={w:<5} {r[0]:6.1f} tok/s (streamed {r[1]:6.1f}), "
                              f"TTFT p50 {1000 * r[2]:.0f} ms", flush=True)
                    proc.send_signal(signal.SIGSTOP)
        finally:
            for proc, _ in servers.values():
                proc.send_signal(signal.SIGCONT)
                stop(proc)
    print(f"\nSmolLM2-135M, {args.threads} torch threads, {args.clients} clients, {args.requests} requests x "
          f"{args.max_tokens} tokens ({'greedy' if fields is None else fields}), --max-batch {args.max_batch}, "
          f"{args.rounds} rounds; medians:")
    first = args.trees[0]
    for w in workloads:
        for tree in args.trees:
            rs = res[(tree, w)]
            tps, stps, ttft = (statistics.median(x[i] for x in rs) for i in range(3))
            ratios = [a[0] / b[0] for a, b in zip(rs, res[(first, w)])]
            print(f"  K={w:<5} {tree:<24} {tps:6.1f} tok/s  streamed {stps:6.1f} tok/s  TTFT p50 {1000 * ttft:4.0f} ms"
                  f"  x{statistics.median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}]")


if __name__ == "__main__":
    main()
