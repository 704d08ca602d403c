"""`loraplex merge`: merge adapters into the base and write a transformers model directory.

W' = W + sum_i w_i * scale_i * B_i @ A_i; the output loads with AutoModelForCausalLM.from_pretrained and needs no
loraplex.
"""

from __future__ import annotations

import argparse
import os

from ..device import DEVICE_HELP, parse_device, resolve_device
from ..models import load_base
from ..report import format_table
from ..outputs import check_output
from ..workflows.export import DTYPES, export_merged
from .flags import add_base, add_command, add_num_layers, add_output_flags


def register(sub: argparse._SubParsersAction) -> list[str]:
    p = add_command(sub, __doc__, run_merge)
    add_base(p)
    p.add_argument("--adapter", required=True, action="append", help="adapter directory (repeat for several)")
    p.add_argument("--weights", type=float, nargs="+", help="one weight per --adapter (default 1.0 each)")
    add_output_flags(p, never="an --adapter or the --base directory")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the written weights")
    p.add_argument("--no-check-base", action="store_true", help="skip the base fingerprint check")
    add_num_layers(p)
    p.add_argument("--device", type=parse_device, default="auto", help=f"where to merge: {DEVICE_HELP}")
    return ["merge"]


def run_merge(args: argparse.Namespace) -> int:
    inputs = [*args.adapter, *([args.base] if os.path.exists(args.base) else [])]
    check_output(args.out, overwrite=args.overwrite, inputs=inputs)  # before the base loads
    model, tokenizer = load_base(args.base, num_layers=args.num_layers)
    model.to(resolve_device(args.device))
    rep = export_merged(model, tokenizer, args.adapter, args.out, weights=args.weights, dtype=args.dtype,
                        check_base_model=not args.no_check_base, overwrite=args.overwrite, inputs=inputs)
    rows = [[a["path"], a["content_hash"][:12], a["weight"]] for a in rep.adapters]
    print(format_table(rows, ["adapter", "hash", "weight"]))
    print(f"wrote {rep.out} ({rep.dtype}); largest unmerge restore error {rep.max_restore_error:.3g}")
    return 0
