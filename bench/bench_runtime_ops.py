"""Batched multi-adapter LoRA ops vs the base matmuls, on the linear layers of one Llama decoder layer.

Shapes: hidden 512, intermediate 1376, LoRA r=8 on q/k/v/o/gate/up/down, float32, 2 CPU threads.
Per scenario (rows x tokens) and number of distinct adapters (row b uses adapter b % n, interleaved), one
"step" runs the 7 base projections, then adds the LoRA of each row in place:
    base      the 7 base matmuls only
    gather    BatchPlan "gather" (per-row padded stacks, 2 bmm per layer)
    segment   BatchPlan "segment" (2 matmuls per distinct adapter per layer)
    auto      the strategy the plan picks by its rule (shown in brackets)
    loop      naive: per row, per layer, functional.lora_linear (the reference's way)
    build     building the BatchPlan once for this batch composition (not part of a step)
Numbers are throughput ratios t_base / t_variant (1.00 = as fast as the base; build: t_base / t_build),
medians of interleaved repeats. A second table times add + remove of one adapter with N already loaded.

    .venv/bin/python bench/bench_runtime_ops.py [--reps 9]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from loraplex.functional import lora_linear
from loraplex.runtime import AdapterPool

HIDDEN, INTER, R = 512, 1376, 8
LAYERS = {  # key -> (in_features, out_features)
    "q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, HIDDEN), "v_proj": (HIDDEN, HIDDEN), "o_proj": (HIDDEN, HIDDEN),
    "gate_proj": (HIDDEN, INTER), "up_proj": (HIDDEN, INTER), "down_proj": (INTER, HIDDEN),
}
SCENARIOS = [("prefill 16x128", 16, 128), ("prefill 64x32", 64, 32), ("decode 64x1", 64, 1)]
DISTINCT = (1, 16, 64)


def adapter(gen: torch.Generator) -> tuple[dict, dict]:
    tensors = {k: (torch.randn(R, i, generator=gen) * 0.02, torch.randn(o, R, generator=gen) * 0.02)
               for k, (i, o) in LAYERS.items()}
    return tensors, {k: 2.0 for k in LAYERS}


def interleaved_times(fns: dict, reps: int, budget_s: float) -> dict[str, list[float]]:
    """Seconds per call of each fn in every repeat, the variants interleaved within each repeat."""
    inner = {}
    for k, f in fns.items():  # warm up, and pick an inner count so one repeat takes ~budget_s
        f()
        t = time.perf_counter()
        f()
        inner[k] = max(1, int(budget_s / max(time.perf_counter() - t, 1e-6)))
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t = time.perf_counter()
            for _ in range(inner[k]):
                f()
            times[k].append((time.perf_counter() - t) / inner[k])
    return times


def interleaved_medians(fns: dict, reps: int, budget_s: float = 0.02) -> dict[str, float]:
    """Median seconds per call of each fn, the variants interleaved within every repeat."""
    return {k: statistics.median(v) for k, v in interleaved_times(fns, reps, budget_s).items()}


def bench_ops(reps: int) -> None:
    gen = torch.Generator().manual_seed(0)
    weights = {k: torch.randn(o, i, generator=gen) / i**0.5 for k, (i, o) in LAYERS.items()}
    pool = AdapterPool(LAYERS, max_plans=0)
    slots = [pool.add(f"a{n}", f"h{n}", *adapter(gen)) for n in range(max(DISTINCT))]
    print(f"{'scenario':<16}{'distinct':>9}{'gather':>9}{'segment':>9}{'auto':>16}{'loop':>8}{'build':>8}")
    for label, B, L in SCENARIOS:
        xs = {k: torch.randn(B, L, i, generator=gen) for k, (i, o) in LAYERS.items()}
        ys = {k: torch.empty(B, L, o) for k, (i, o) in LAYERS.items()}

        def base() -> None:
            for k, W in weights.items():
                torch.matmul(xs[k], W.T, out=ys[k])

        for n in DISTINCT:
            if n > B:
                continue
            rows = [slots[b % n] for b in range(B)]
            plans = {s: pool.plan(rows, strategy=s) for s in ("gather", "segment", "auto")}
            ad = {k: {s: pool.tensors(s, k) for s in set(rows)} for k in LAYERS}

            def step(plan):
                def f() -> None:
                    base()
                    for k in LAYERS:
                        plan.apply_(k, xs[k], ys[k])
                return f

            def loop() -> None:
                base()
                for k in LAYERS:
                    for b, s in enumerate(rows):
                        A, Bm, scale = ad[k][s]
                        ys[k][b] += lora_linear(xs[k][b], A, Bm, scale)

            fns = {"base": base, **{s: step(p) for s, p in plans.items()}, "loop": loop,
                   "build": lambda: pool.plan(rows, strategy="auto")}
            t = interleaved_medians(fns, reps)
            r = {k: t["base"] / v for k, v in t.items()}
            auto = f"{r['auto']:.2f} [{plans['auto'].strategy}]"
            print(f"{label:<16}{n:>9}{r['gather']:>9.2f}{r['segment']:>9.2f}{auto:>16}{r['loop']:>8.2f}"
                  f"{r['build']:>8.2f}")


def bench_add(reps: int) -> None:
    """add + remove of one adapter with N loaded: constant cost means no re-stacking on load."""
    gen = torch.Generator().manual_seed(1)
    new = adapter(gen)
    pools = {}
    for n in (1, 64, 256):
        pools[n] = AdapterPool(LAYERS)
        for i in range(n):
            pools[n].add(f"a{i}", f"h{i}", *adapter(gen))

    def cycle(p: AdapterPool):
        def f() -> None:
            p.add("new", "hnew", *new)
            p.remove("new")
        return f

    t = interleaved_medians({n: cycle(p) for n, p in pools.items()}, reps)
    print("\nadd + remove one adapter (7 layers, r=8), N already loaded:")
    print("  " + "   ".join(f"N={n}: {t[n] * 1e3:.2f} ms ({t[1] / t[n]:.2f}x N=1)" for n in t))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=9)
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ratios = t_base / t_variant "
          f"(median of {args.reps} interleaved repeats)\n")
    bench_ops(args.reps)
    bench_add(args.reps)


if __name__ == "__main__":
    main()
