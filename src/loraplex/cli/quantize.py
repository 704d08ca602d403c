"""`loraplex quantize`: quantize a base (int8 or NF4) and save it.

Replace every linear layer but the output head by a quantized one and write model.safetensors + quantization.json;
load it back with load_quantized.

    loraplex quantize --base smollm2 --scheme nf4 --double-quant --out smollm2-nf4
A quantized directory loads back onto its float architecture with
`load_quantized(load_base("smollm2")[0], "smollm2-nf4")`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..models import load_base
from ..report import format_table, human_bytes
from ..quant.io import save_quantized
from ..quant.linear import BACKENDS, SCHEMES, quantize_model
from .flags import add_base, add_command, add_num_layers

def register(sub: argparse._SubParsersAction) -> list[str]:
    p = add_command(sub, __doc__, run_quantize)
    add_base(p)
    p.add_argument("--scheme", required=True, choices=SCHEMES, help="int8: per-row absmax; nf4: 4-bit NormalFloat")
    p.add_argument("--double-quant", action="store_true", help="nf4: store the block scales in 8 bits too")
    p.add_argument("--block-size", type=int, default=64, help="nf4: elements per scale block (default 64)")
    p.add_argument("--backend", choices=BACKENDS, default="loraplex",
                   help="library that quantizes: loraplex (pure PyTorch, the reference), bitsandbytes (nf4), "
                        "torchao (int8); the file layout is the same for all")
    add_num_layers(p)
    p.add_argument("--out", required=True, help="output directory (written atomically)")

    return ["quantize"]


def run_quantize(args: argparse.Namespace) -> int:
    model, _ = load_base(args.base, num_layers=args.num_layers)
    rep = quantize_model(model, args.scheme, block_size=args.block_size, double_quant=args.double_quant,
                         backend=args.backend)
    out = save_quantized(model, args.out)
    disk = sum(f.stat().st_size for f in Path(out).iterdir() if f.is_file())
    rows = [["modules quantized", f"{len(rep.modules):,}"],
            ["model bytes before", f"{rep.bytes_before:,} ({human_bytes(rep.bytes_before)})"],
            ["model bytes after", f"{rep.bytes_after:,} ({human_bytes(rep.bytes_after)}, {rep.ratio:.3f}x)"],
            ["quantized layers",
             f"{human_bytes(rep.replaced_bytes_before)} -> {human_bytes(rep.replaced_bytes_after)}"],
            ["on disk", f"{disk:,} ({human_bytes(disk)})"]]
    print(format_table(rows, ["", ""], align="ll"))
    num = "" if args.num_layers is None else f", num_layers={args.num_layers}"
    print(f"wrote {out}; load it with load_quantized(load_base({args.base!r}{num})[0], {str(out)!r})")
    return 0
