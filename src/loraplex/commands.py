"""Core subcommands: `info` (parameter report) and `merge` (export a merged transformers directory)."""

from __future__ import annotations

import argparse
import json
import os

from .config import LoraConfig
from .device import DEVICE_HELP, parse_device, resolve_device
from .export import DTYPES, export_merged
from .inject import inject
from .models import base_name, load_base
from .report import WeightArithmetic, format_table, human_bytes, parameter_report
from .store import check_output, load_adapter, read_adapter


def register(sub: argparse._SubParsersAction) -> list[str]:
    p = sub.add_parser("info", help="parameter report of a base, or of a base with an adapter",
                       description="Print trainable vs frozen parameters, per module, adapter bytes on disk, and "
                                   "inference cost kept separate (W+A+B) vs merged (W').")
    p.add_argument("base", help="a local transformers model directory, or 'smollm2' (the embedded default)")
    p.add_argument("adapter", nargs="?", help="an adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--num-layers", type=int, help="load only the first N decoder layers of the base")
    p.add_argument("--rank", type=int, default=8, help="rank for the what-if report when no adapter is given")
    p.add_argument("--modules", action="store_true", help="also list every LoRA module")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run_info)

    p = sub.add_parser("merge", help="merge adapters into the base and write a transformers model directory",
                       description="W' = W + sum_i w_i * scale_i * B_i @ A_i; the output loads with "
                                   "AutoModelForCausalLM.from_pretrained and needs no loraplex.")
    p.add_argument("--base", required=True, help="a local transformers model directory, or 'smollm2'")
    p.add_argument("--adapter", required=True, action="append", help="adapter directory (repeat for several)")
    p.add_argument("--weights", type=float, nargs="+", help="one weight per --adapter (default 1.0 each)")
    p.add_argument("--out", required=True, help="output directory: new or empty (written atomically)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out (atomically; never an --adapter or the --base directory)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the written weights")
    p.add_argument("--no-check-base", action="store_true", help="skip the base fingerprint check")
    p.add_argument("--num-layers", type=int, help="load only the first N decoder layers of the base")
    p.add_argument("--device", type=parse_device, default="auto", help=f"where to merge: {DEVICE_HELP}")
    p.set_defaults(func=run_merge)
    return ["info", "merge"]


def run_info(args: argparse.Namespace) -> int:
    model, _ = load_base(args.base, num_layers=args.num_layers)
    if args.adapter:
        af = read_adapter(args.adapter)
        load_adapter(model, af, "adapter")
        rep = parameter_report(model)
        files = sorted(p for p in af.path.iterdir() if p.is_file())
        disk = sum(p.stat().st_size for p in files)
        facts = {"adapter": str(af.path), "content_hash": af.content_hash, "r": af.config.r,
                 "lora_alpha": af.config.lora_alpha, "target_modules": af.config.target_modules,
                 "bytes_on_disk": disk, "modules": len(rep.modules), "base": base_name(model)}
        if args.json:
            print(json.dumps({**facts, "trainable": rep.trainable, "frozen": rep.frozen,
                              "inference": rep.inference_params("adapter")}, indent=2))
            return 0
        print(format_table([[k, v] for k, v in facts.items() if k != "bytes_on_disk"]
                           + [["bytes on disk", f"{disk:,} ({human_bytes(disk)})"]], ["", ""], align="ll"))
        print()
        print(rep.table(per_module=args.modules))
        return 0
    # no adapter: what an r=--rank all-linear adapter would cost on this base
    inject(model, LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules="all-linear"), "what_if")
    rep = parameter_report(model)
    if args.json:
        print(json.dumps({"base": base_name(model), "params": rep.frozen, "rank": args.rank,
                          "all_linear_trainable": rep.trainable, "modules": len(rep.modules)}, indent=2))
        return 0
    print(f"base: {base_name(model)}  ({rep.frozen:,} parameters)")
    print(f"an r={args.rank} adapter on all {len(rep.modules)} linear layers would train {rep.trainable:,} "
          f"parameters ({100 * rep.trainable / rep.frozen:.3f}% of the base), {human_bytes(rep.adapter_bytes['what_if'])} "
          "in fp32")
    if args.modules:
        print()
        print(rep.table(per_module=True))
    example = WeightArithmetic(4096, 4096, 8)
    print(f"(for scale: one 4096x4096 weight with r=8 trains {example.lora_trainable:,} of "
          f"{example.full_finetune_trainable:,} parameters)")
    return 0


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
