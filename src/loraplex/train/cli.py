"""`loraplex train`: the command-line face of `loraplex.train.train` (one flag per TrainConfig field).

    loraplex train --base smollm2 --data chatterbot:tech_support --out runs/tech --max-steps 60
    loraplex train --base smollm2 --data a.jsonl --data b.jsonl --out-per-data --out runs/ab
    torchrun --nproc-per-node 2 -m loraplex train --base smollm2 --data d.jsonl --out runs/ddp
    torchrun --nproc-per-node 8 -m loraplex train --fsdp --bf16 --device cuda --base DIR --data d.jsonl --out runs/f
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from ..config import ALL_LINEAR
from ..device import DEVICE_HELP, parse_device
from ..errors import ConfigError, UsageError
from ..report import format_table, human_bytes

_REGEX_CHARS = re.compile(r"[\\^$.|?*+()\[\]{}]")


def parse_targets(value: str) -> str | list[str]:
    """--targets: "all-linear"; a regex (anything holding a regex metacharacter, matched against the full
    module name, e.g. '.*\\.(q|v)_proj'); else a comma list of module names ('q_proj,v_proj')."""
    value = value.strip()
    if value.lower() == ALL_LINEAR:
        return ALL_LINEAR
    if _REGEX_CHARS.search(value):
        return value
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise ConfigError(f"--targets: expected 'all-linear', a regex or a comma list of module names, got {value!r}")
    return names


def parse_init(value: str) -> bool | str:
    """--init: "true"/"false" (any case) as booleans, anything else as given (TrainConfig checks it)."""
    return {"true": True, "false": False}.get(value.strip().lower(), value.strip())


def register(sub: argparse._SubParsersAction) -> list[str]:
    p = sub.add_parser(
        "train", help="train LoRA adapters (several in one pass with --out-per-data; DDP under torchrun)",
        description="Train a LoRA adapter on a frozen base with loraplex's own loop (AdamW, warmup + cosine, "
                    "accumulation, clipping, held-out eval, atomic checkpoints). Under torchrun it trains with DDP.")
    p.add_argument("--base", required=True, help="'smollm2' or a transformers model directory with a tokenizer")
    p.add_argument("--data", required=True, action="append",
                   help="x.jsonl, chatterbot:TOPIC or fortunes:CATEGORY (repeat for several)")
    p.add_argument("--out", required=True, help="output directory (adapter, metrics.jsonl, loss.png, summary)")
    p.add_argument("--out-per-data", action="store_true",
                   help="one adapter per --data, all trained in one pass over the base: OUT/<name>/")
    g = p.add_argument_group("adapter")
    g.add_argument("--rank", type=int, default=8)
    g.add_argument("--alpha", type=float, default=16.0)
    g.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (0: no dropout module at all)")
    g.add_argument("--dora", dest="use_dora", action="store_true",
                   help="DoRA (weight-decomposed LoRA): also learn a magnitude per output feature")
    g.add_argument("--init", type=parse_init, default=True,
                   help="init_lora_weights: true (default), false, gaussian, orthogonal, or pissa, pissa_niter_N, "
                        "olora (these rewrite the frozen base in memory; the adapter is saved as a plain LoRA of rank "
                        "2r)")
    g.add_argument("--targets", type=parse_targets, default=ALL_LINEAR,
                   help="'all-linear', a regex over module names, or a comma list (default all-linear)")
    g.add_argument("--quantize", choices=("none", "int8", "nf4"), default="none",
                   help="quantize the frozen base first (QLoRA with nf4)")
    g.add_argument("--quant-block-size", type=int, default=64,
                   help="nf4: elements per scale block (default 64; 32 or 16 stay closer to the float base)")
    g.add_argument("--double-quant", action="store_true", help="nf4: store the block scales in 8 bits too")
    g.add_argument("--num-layers", type=int, help="keep only the first N decoder layers of the base")
    g = p.add_argument_group("optimization")
    g.add_argument("--lr", type=float, default=2e-4)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--warmup-ratio", type=float, default=0.1)
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="clip per adapter (0 disables)")
    g.add_argument("--epochs", type=int, default=1)
    g.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    g.add_argument("--batch-size", type=int, default=8, help="rows per process per micro-batch")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("data")
    g.add_argument("--max-length", type=int, default=512, help="tokens per example (or per packed row)")
    g.add_argument("--packing", action="store_true", help="pack examples into rows of --max-length tokens")
    g.add_argument("--eval-split", type=float, default=0.1, help="fraction of distinct examples held out")
    g.add_argument("--skip-bad", action="store_true", help="skip malformed records (counted) instead of failing")
    g = p.add_argument_group("run")
    g.add_argument("--eval-every", type=int, help="steps between evaluations (default: 4 per run; 0: end only)")
    g.add_argument("--log-every", type=int, default=1, help="steps between metrics rows")
    g.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (0: none)")
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint (start fresh if none)")
    g.add_argument("--overwrite", action="store_true", help="start over in an OUT that holds an earlier run")
    g.add_argument("--device", type=parse_device, default="auto", help=DEVICE_HELP)
    g.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the base and the adapters over the processes (FSDP2) instead of DDP")
    g.add_argument("--bf16", action="store_true",
                   help="bf16 compute over fp32 adapter weights (FSDP mixed precision; otherwise autocast)")
    p.set_defaults(func=run_train)
    return ["train"]


def run_train(args: argparse.Namespace) -> int:
    from .loop import TrainConfig
    from .run import train

    fields = ("base", "data", "out", "out_per_data", "rank", "alpha", "dropout", "use_dora", "init", "targets",
              "quantize", "quant_block_size", "double_quant", "num_layers", "lr", "weight_decay", "warmup_ratio",
              "max_grad_norm", "epochs", "max_steps", "batch_size", "grad_accum", "seed", "max_length", "packing",
              "eval_split", "skip_bad", "eval_every", "log_every", "save_every", "resume", "overwrite", "device",
              "fsdp", "bf16", "progress")
    try:
        config = TrainConfig(**{f: getattr(args, f) for f in fields})
    except ConfigError as exc:  # a flag value the checks refuse: a usage error, before anything is loaded
        raise UsageError(str(exc)) from None
    result = train(config)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return 0
    s = result.summary
    if result.resumed_from is not None:
        print(f"resumed from the checkpoint at step {result.resumed_from}")
    rows = [[name, f"{a['trainable_params']:,}", a["train_examples"], a["eval_examples"], a["steps"],
             _loss(a["eval_loss_before"]), _loss(a["eval_loss_after"]), str(result.adapters[name])]
            for name, a in s["adapters"].items()]
    print(format_table(rows, ["adapter", "trainable", "train ex", "eval ex", "steps", "eval before", "eval after",
                              "written to"]))
    facts = [["trainable params", f"{s['trainable_params']:,} of {s['trainable_params'] + s['frozen_params']:,} "
                                  f"({100 * s['trainable_params'] / (s['trainable_params'] + s['frozen_params']):.3f}%)"],
             ["peak RSS", human_bytes(s["peak_rss_bytes"])],
             ["tokens", f"{s['tokens']:,} in {s['train_seconds']:.1f} s ({s['tokens_per_s']:,.0f} tokens/s)"],
             ["processes", s["world_size"]]]
    if s["peak_cuda_bytes"]:
        facts.insert(2, ["peak CUDA memory", human_bytes(s["peak_cuda_bytes"])])
    print(format_table(facts, ["", ""], align="ll"))
    skipped = {src: f["skipped"] for src, f in s["data"].items() if f["skipped"]}
    if skipped:
        print(f"skipped bad records: {skipped}", file=sys.stderr)
    return 0


def _loss(v) -> str:
    return "-" if v is None else f"{v:.4f}"
