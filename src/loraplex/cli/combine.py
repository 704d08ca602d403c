"""`loraplex combine`: combine adapters into a new adapter (linear, cat, svd, ties, dare...).

A new adapter from several, e.g. 'cat' gives delta = sum_i w_i * scale_i * B_i @ A_i exactly (rank = sum of ranks);
see docs/combine.md for every method.
"""

from __future__ import annotations

import argparse

from ..workflows.combine import METHODS, combine, save_combined
from ..outputs import check_output
from .flags import add_command, add_output_flags


def register(sub: argparse._SubParsersAction) -> list[str]:
    p = add_command(sub, __doc__, run_combine)
    p.add_argument("adapters", nargs="+", help="adapter directories (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--weights", type=float, nargs="+", required=True, help="one weight per adapter (may be negative)")
    p.add_argument("--method", choices=METHODS, default="cat", help="how to combine (default: cat, exact)")
    p.add_argument("--density", type=float,
                   help="fraction kept, in (0, 1]: ties, dare_linear, dare_ties, magnitude_prune")
    p.add_argument("--rank", type=int, help="output rank bound: svd and the pruning methods (default: max input rank)")
    p.add_argument("--seed", type=int, default=0, help="seed of DARE's random masks")
    p.add_argument("--union", action="store_true", help="combine over the union of target modules (missing = 0)")
    add_output_flags(p, "adapter directory", never="an input")
    p.add_argument("--modules", action="store_true", help="one table row per module instead of per module name")

    return ["combine"]


def run_combine(args: argparse.Namespace) -> int:
    check_output(args.out, overwrite=args.overwrite, inputs=args.adapters)  # before the work
    result = combine(args.adapters, args.weights, args.method, density=args.density, rank=args.rank,
                     seed=args.seed, union=args.union)
    saved = save_combined(result, args.out, overwrite=args.overwrite)
    print(result.report.table(per_module=args.modules))
    print(f"wrote {saved.path} (r={result.config.r}, content hash {saved.content_hash[:12]})")
    return 0
