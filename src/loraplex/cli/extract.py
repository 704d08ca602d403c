"""`loraplex extract`: extract a LoRA adapter from a fully fine-tuned model (truncated SVD).

Per target: W_ft - W_base = U S V^T, keep the top rank (or the energy fraction); prints the relative error per
module.
"""

from __future__ import annotations

import argparse
import os

from ..models import load_base
from ..outputs import check_output
from ..workflows.extract import extract_lora, save_extracted
from .flags import add_base, add_command, add_num_layers, add_output_flags


def register(sub: argparse._SubParsersAction) -> list[str]:
    p = add_command(sub, __doc__, run_extract)
    add_base(p)
    p.add_argument("--finetuned", required=True, help="the fully fine-tuned model directory")
    p.add_argument("--rank", type=int, help="rank per module")
    p.add_argument("--energy", type=float, help="smallest rank keeping this fraction of ||delta||^2 (capped by --rank)")
    p.add_argument("--targets", nargs="+", default=["all-linear"],
                   help="module names (or 'all-linear', the default) to extract")
    add_num_layers(p, "both models")
    add_output_flags(p, "adapter directory")
    p.add_argument("--modules", action="store_true", help="one table row per module instead of per module name")
    return ["extract"]


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
