"""The sampler (runtime/sampling.py `sample_next`) on one decode step's logits: 16 rows x SmolLM2's 49,152-token
vocabulary, against the sort-based sampler it replaced (a full descending sort of every sampled row), interleaved.

    flock /tmp/loraplex-bench.lock .venv/bin/python bench/bench_sampling.py [--reps 15]

Logits are random normal times a scale: 0.5 is flat (a top_p 0.9 nucleus of tens of thousands of tokens, as a
prompt of random token ids gives), 8 is peaked (a few tokens, as most real text). Printed per configuration:
median ms per call of each sampler and the paired ratio sorted / sample_next (> 1: faster), median [min-max].
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from loraplex.report import format_table
from loraplex.runtime.sampling import SamplingParams, sample_next

CONFIGS = {
    "temperature 1": SamplingParams(temperature=1.0),
    "temperature 0.7, top_p 0.9": SamplingParams(temperature=0.7, top_p=0.9),
    "temperature 1, top_p 0.95": SamplingParams(temperature=1.0, top_p=0.95),
    "temperature 1, top_k 50": SamplingParams(temperature=1.0, top_k=50),
    "temperature 1, min_p 0.05": SamplingParams(temperature=1.0, min_p=0.05),
    "greedy": SamplingParams(temperature=0.0),
}


def sorted_sampler(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """The sampler before: per sampled row, softmax, a full descending sort, min_p / top_k / top_p on the sorted
    probabilities, an inverse-CDF draw in sorted order (no penalties here)."""
    out = logits.argmax(dim=-1)
    for b, p in enumerate(params):
        if p.greedy:
            continue
        sorted_p, order = torch.softmax((logits[b] - logits[b].max()) / p.temperature, dim=-1).sort(descending=True)
        if p.min_p > 0 or p.top_k > 0:
            keep = sorted_p >= p.min_p * sorted_p[0]
            if p.top_k > 0:
                keep[p.top_k:] = False
            keep[0] = True
            sorted_p = sorted_p * keep
            sorted_p = sorted_p / sorted_p.sum()
        keep = (sorted_p.cumsum(0) - sorted_p) < p.top_p
        keep[0] = True
        sorted_p = sorted_p * keep
        u = torch.rand(()) * sorted_p.sum()
        i = int(torch.searchsorted(sorted_p.cumsum(0), u, right=True).clamp(max=int((sorted_p > 0).sum()) - 1))
        out[b] = order[i]
    return out


def timed(fn: Callable[[], object], calls: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t) / calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--scales", default="0.5,8", help="comma-separated logit scales (flat ... peaked)")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--calls", type=int, default=5, help="calls per sampler per repeat")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    for flag in ("rows", "vocab", "reps", "calls", "threads"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    torch.set_num_threads(args.threads)
    table = []
    for scale in (float(x) for x in args.scales.split(",")):
        logits = torch.randn(args.rows, args.vocab, generator=torch.Generator().manual_seed(0)) * scale
        for name, p in CONFIGS.items():
            params = [p] * args.rows
            gens = [None] * args.rows
            runs = {"sorted": lambda: sorted_sampler(logits, params), "sample_next": lambda: sample_next(logits, params, gens)}
            times: dict[str, list[float]] = {k: [] for k in runs}
            for rep in range(args.reps):
                for k in (list(runs) if rep % 2 == 0 else list(runs)[::-1]):
                    times[k].append(timed(runs[k], args.calls))
            ratios = [a / b for a, b in zip(times["sorted"], times["sample_next"])]
            table.append([f"{scale:g}", name, f"{1e3 * statistics.median(times['sorted']):.2f}",
                          f"{1e3 * statistics.median(times['sample_next']):.2f}",
                          f"{statistics.median(ratios):.1f}x [{min(ratios):.1f}-{max(ratios):.1f}]"])
    print(f"{args.rows} rows x {args.vocab} tokens, {args.threads} threads, {args.reps} repeats x {args.calls} calls")
    print(format_table(table, ["scale", "sampling", "sorted ms", "sample_next ms", "ratio"], align="llrrr"))


if __name__ == "__main__":
    main()
