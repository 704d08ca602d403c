"""One decode step of the serving engine's compact decoder (CompactLlama.decode) on SmolLM2-135M, variants
interleaved in one process, as ratios.

Batch 16 lanes at position 16 (prompts of 16 tokens prefilled once), random r=8 adapters on all seven
projections (row b uses adapter b % K; K = 0: no plan). Variants (all in one process, each with its own cache):
    unfused/aten     one GEMM per projection through F.linear (the reference decoder)
    fused/aten       q/k/v and gate/up as one GEMM each
    unfused/onednn   oneDNN prepacked weights (runtime/kernels.py)
    fused/onednn     both (the default where oneDNN computes the dtype natively)
    <variant>+compile  the same decode step through torch.compile graphs (runtime/compiled.py); compiled during
                     the warm-up step (not timed)
    baseline         with --baseline FILE: CompactLlama from another decoder.py (e.g. main's), run against this
                     checkout's runtime (`git show main:src/loraplex/runtime/decoder.py > /tmp/decoder_main.py`)
Each repeat times `--steps` decode steps of every variant, the order rotating; printed: median ms per step,
tokens/s (= batch / step time), and the median [min-max] over repeats of the paired ratio
t(unfused/aten) / t(variant) (> 1: faster than the reference).

    flock /tmp/loraplex-bench.lock .venv/bin/python bench/bench_decode.py [--threads 1] [--reps 7] \
        [--variants unfused/aten,fused/onednn,fused/onednn+compile]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time

import torch

from loraplex import models
from loraplex.runtime import AdapterPool
from loraplex.serve import CompactLlama
from loraplex.runtime.kernels import onednn_supports

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
REFERENCE = "unfused/aten"


def load_baseline(path: str) -> type:
    """CompactLlama from the decoder.py at `path`, imported as a module of this checkout's loraplex.runtime."""
    spec = importlib.util.spec_from_file_location("loraplex.runtime._bench_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.CompactLlama


def variants(hf: torch.nn.Module, dtype: torch.dtype, baseline: type | None, only: list[str] | None
             ) -> dict[str, CompactLlama]:
    kernels = ["aten"] + (["onednn"] if onednn_supports(torch.device("cpu"), dtype) else [])
    names = [f"{'fused' if f else 'unfused'}/{k}{c}" for c in ("", "+compile") for k in kernels for f in (False, True)]
    out = {n: CompactLlama(hf, fused=n.startswith("fused"), kernel=n.split("/")[1].split("+")[0],
                           compile=n.endswith("+compile"))
           for n in names if (n in only if only else not n.endswith("+compile"))}
    if baseline is not None:
        out["baseline"] = baseline(hf)
    return out


def random_pool(model: CompactLlama, n: int, r: int, dtype: torch.dtype) -> AdapterPool:
    gen = torch.Generator().manual_seed(0)
    pool = AdapterPool(model.layer_shapes(), dtype=dtype, max_plans=0)
    for a in range(n):
        t = {k: (torch.randn(r, i, generator=gen) * 0.02, torch.randn(o, r, generator=gen) * 0.02)
             for k, (i, o) in model.layer_shapes().items()}
        pool.add(f"a{a}", f"h{a}", t, {k: 2.0 for k in t})
    return pool


def bench(models_: dict[str, CompactLlama], plan, args) -> tuple[list[list[str]], list[str]]:
    """(the table's rows, with --profile: one torch.profiler table per variant, of `--steps` steps after the timing)."""
    B, P = args.batch, args.prompt
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 1000, (B, P), generator=gen)
    tokens = torch.randint(3, 1000, (B,), generator=gen)
    caches = {}
    for k, m in models_.items():
        caches[k] = m.new_cache(max_lanes=B, max_len=max(P + args.steps + 1, 512))  # a compiled step attends over 64
        m.prefill(ids, torch.full((B,), P), caches[k], list(range(B)), plan)
        m.decode(tokens, torch.full((B,), P), caches[k], plan)  # warm-up

    def run(k: str) -> float:
        t = time.perf_counter()
        for s in range(args.steps):
            models_[k].decode(tokens, torch.full((B,), P + s), caches[k], plan)
        return (time.perf_counter() - t) / args.steps

    names = list(models_)
    times: dict[str, list[float]] = {k: [] for k in names}
    ratios: dict[str, list[float]] = {k: [] for k in names}
    for rep in range(args.reps):
        this = {k: run(k) for k in names[rep % len(names):] + names[: rep % len(names)]}
        for k in names:
            times[k].append(this[k])
            ratios[k].append(this[REFERENCE] / this[k])
    rows = []
    for k in names:
        med = statistics.median(times[k])
        rows.append([k, f"{1000 * med:.1f}", f"{B / med:.0f}",
                     f"{statistics.median(ratios[k]):.2f} [{min(ratios[k]):.2f}-{max(ratios[k]):.2f}]"])
    profiles = []
    for k in names if args.profile else ():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            run(k)
        profiles.append(f"{k}, {args.steps} steps:\n"
                        + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile))
    return rows, profiles


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: steady on a shared box)")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--steps", type=int, default=4, help="decode steps per variant per repeat")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--adapters", default="0,1,16", help="comma-separated numbers of distinct adapters")
    p.add_argument("--dtypes", default="fp32,bf16", help=f"comma-separated, of {list(DTYPES)}")
    p.add_argument("--layers", type=int, default=None, help="keep the first N decoder layers (default: all)")
    p.add_argument("--baseline", help="another decoder.py to time as variant 'baseline'")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, torch.profiler over --steps steps of each variant: its N costliest ops")
    p.add_argument("--variants", help=f"comma-separated variants to run (default: the eager ones); {REFERENCE} "
                   "is always run")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    baseline = load_baseline(args.baseline) if args.baseline else None
    print(f"SmolLM2-135M, batch {args.batch}, position {args.prompt}, r={args.rank}, {args.threads} thread(s), "
          f"{args.reps} repeats x {args.steps} steps; ratio = t({REFERENCE}) / t(variant), median [min-max]")
    for dname in args.dtypes.split(","):
        dtype = DTYPES[dname]
        hf, _ = models.load_base("smollm2", dtype=dtype, num_layers=args.layers)
        ms = variants(hf, dtype, baseline, [REFERENCE, *args.variants.split(",")] if args.variants else None)
        for n in (int(x) for x in args.adapters.split(",")):
            pool = random_pool(ms[REFERENCE], n, args.rank, dtype) if n else None
            plan = pool.plan([b % n for b in range(args.batch)]) if n else None
            print(f"\n{dname}, {n} adapter(s){f' ({plan.strategy})' if plan else ''}")
            print(f"  {'variant':<16}{'ms/step':>9}{'tok/s':>7}  ratio")
            rows, profiles = bench(ms, plan, args)
            for row in rows:
                print(f"  {row[0]:<16}{row[1]:>9}{row[2]:>7}  {row[3]}", flush=True)
            print(*profiles, sep="\n")


if __name__ == "__main__":
    main()
