"""Subcommands `combine` (a new adapter from several) and `extract` (an adapter from a fully fine-tuned model)."""

from __future__ import annotations

import argparse
import os

from ..workflows.combine import METHODS, combine, save_combined
from ..workflows.extract import extract_lora, save_extracted
from ..models import load_base
from ..store import check_output


def register(sub: argparse._SubParsersAction) -> list[str]:
    p = sub.add_parser("combine", help="combine adapters into a new adapter (linear, cat, svd, ties, dare...)",
                       description="A new adapter from several, e.g. 'cat' gives delta = sum_i w_i * scale_i * "
                                   "B_i @ A_i exactly (rank = sum of ranks); see docs/combine.md for every method.")
    p.add_argument("adapters", nargs="+", help="adapter directories (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--weights", type=float, nargs="+", required=True, help="one weight per adapter (may be negative)")
    p.add_argument("--method", choices=METHODS, default="cat", help="how to combine (default: cat, exact)")
    p.add_argument("--density", type=float,
                   help="fraction kept, in (0, 1]: ties, dare_linear, dare_ties, magnitude_prune")
    p.add_argument("--rank", type=int, help="output rank bound: svd and the pruning methods (default: max input rank)")
    p.add_argument("--seed", type=int, default=0, help="seed of DARE's random masks")
    p.add_argument("--union", action="store_true", help="combine over the union of target modules (missing = 0)")
    p.add_argument("--out", required=True, help="output adapter directory: new or empty (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (atomically; never an input)")
    p.add_argument("--modules", action="store_true", help="one table row per module instead of per module name")
    p.set_defaults(func=run_combine)

    p = sub.add_parser("extract", help="extract a LoRA adapter from a fully fine-tuned model (truncated SVD)",
                       description="Per target: W_ft - W_base = U S V^T, keep the top rank (or the energy fraction); "
                                   "prints the relative error per module.")
    p.add_argument("--base", required=True, help="the base: a local transformers model directory, or a spec")
    p.add_argument("--finetuned", required=True, help="the fully fine-tuned model directory")
    p.add_argument("--rank", type=int, help="rank per module")
    p.add_argument("--energy", type=float, help="smallest rank keeping this fraction of ||delta||^2 (capped by --rank)")
    p.add_argument("--targets", nargs="+", default=["all-linear"],
                   help="module names (or 'all-linear', the default) to extract")
    p.add_argument("--num-layers", type=int, help="load only the first N decoder layers of both models")
    p.add_argument("--out", required=True, help="output adapter directory: new or empty (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (atomically)")
    p.add_argument("--modules", action="store_true", help="one table row per module instead of per module name")
    p.set_defaults(func=run_extract)
    return ["combine", "extract"]


def run_combine(args: argparse.Namespace) -> int:
    check_output(args.out, overwrite=args.overwrite, inputs=args.adapters)  # before the work
    result = combine(args.adapters, args.weights, args.method, density=args.density, rank=args.rank,
                     seed=args.seed, union=args.union)
    saved = save_combined(result, args.out, overwrite=args.overwrite)
    print(result.report.table(per_module=args.modules))
    print(f"wrote {saved.path} (r={result.config.r}, content hash {saved.content_hash[:12]})")
    return 0


def run_extract(args: argparse.Namespace) -> int:
    models = [m for m in (args.base, args.finetuned) if os.path.exists(m)]
    check_output(args.out, overwrite=args.overwrite, inputs=models)  # before the models load
    base, _ = load_base(args.base, num_layers=args.num_layers)
    finetuned, _ = load_base(args.finetuned, num_layers=args.num_layers)
    targets = args.targets[0] if args.targets == ["all-linear"] else args.targets
    adapter, report = extract_lora(base, finetuned, rank=args.rank, energy=args.energy, targets=targets)
    saved = save_extracted(adapter, report, args.out, overwrite=args.overwrite)
    print(report.table(per_module=args.modules))
    print(f"wrote {saved.path} (r={adapter.config.r}, content hash {saved.content_hash[:12]})")
    return 0
