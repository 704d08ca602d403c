"""`loraplex info`: parameter report of a base, or of a base with an adapter.

Print trainable vs frozen parameters, per module, adapter bytes on disk, and inference cost kept separate (W+A+B) vs
merged (W').
"""

from __future__ import annotations

import argparse
import json

from ..config import LoraConfig
from ..inject import inject
from ..models import base_name, load_base
from ..report import WeightArithmetic, format_table, human_bytes, parameter_report
from ..store import load_adapter, read_adapter
from .flags import add_base, add_command, add_num_layers, default_of


def register(sub: argparse._SubParsersAction) -> list[str]:
    p = add_command(sub, __doc__, run_info)
    add_base(p, positional=True)
    p.add_argument("adapter", nargs="?", help="an adapter directory (adapter_config.json + adapter_model.safetensors)")
    add_num_layers(p)
    p.add_argument("--rank", type=int, default=default_of(LoraConfig, "r"),
                   help="rank for the what-if report when no adapter is given")
    p.add_argument("--modules", action="store_true", help="also list every LoRA module")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    return ["info"]


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
    inject(model, LoraConfig(r=args.rank, target_modules="all-linear"), "what_if")  # alpha: LoraConfig's
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
