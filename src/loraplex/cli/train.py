"""`loraplex train`: train LoRA adapters (several in one pass with --out-per-data; DDP under torchrun).

Train a LoRA adapter on a frozen base with loraplex's own loop (AdamW, warmup + cosine, accumulation, clipping,
held-out eval, atomic checkpoints). Under torchrun it trains with DDP.

loraplex train --base smollm2 --data chatterbot:tech_support --out runs/tech --max-steps 60
loraplex train --base smollm2 --data a.jsonl --data b.jsonl --out-per-data --out runs/ab
torchrun --nproc-per-node 2 -m loraplex train --base smollm2 --data d.jsonl --out runs/ddp
torchrun --nproc-per-node 8 -m loraplex train --fsdp --bf16 --device cuda --base DIR --data d.jsonl --out runs/f
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys

from ..config import ALL_LINEAR
from ..device import DEVICE_HELP, parse_device
from ..errors import ConfigError, UsageError
from ..report import format_table, human_bytes
from ..train.config import TrainConfig
from .flags import Flag, add_command, add_dataclass_flags

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


# TrainConfig field -> its flag's help and group (names, types and defaults come from TrainConfig itself)
FLAGS: dict[str, Flag] = {
    "base": Flag("'smollm2' or a transformers model directory with a tokenizer"),
    "data": Flag("x.jsonl, chatterbot:TOPIC or fortunes:CATEGORY (repeat for several)", overrides={"action": "append"}),
    "out": Flag("output directory (adapter, metrics.jsonl, loss.png, summary)"),
    "out_per_data": Flag("one adapter per --data, all trained in one pass over the base: OUT/<name>/"),
    "rank": Flag(group="adapter"),
    "alpha": Flag(group="adapter"),
    "dropout": Flag("LoRA dropout (0: no dropout module at all)", "adapter"),
    "use_dora": Flag("DoRA (weight-decomposed LoRA): also learn a magnitude per output feature", "adapter",
                     name="dora"),
    "init": Flag("init_lora_weights: true (default), false, gaussian, orthogonal, or pissa, pissa_niter_N, olora "
                 "(these rewrite the frozen base in memory; the adapter is saved as a plain LoRA of rank 2r), "
                 "eva (A from the SVD of the training data's activations), loftq (with --quantize: a base quantized "
                 "so that base + adapter start near the float weights; written to OUT/loftq-base)",
                 "adapter", {"type": parse_init}),
    "eva_rho": Flag("--init eva: each layer may take up to round(rank * rho) ranks (1: no redistribution)", "adapter"),
    "eva_tau": Flag("--init eva: cosine similarity at which a singular vector has converged", "adapter"),
    "eva_label_mask": Flag("--init eva: only target tokens (not prompt or padding) feed the SVD", "adapter"),
    "eva_whiten": Flag("--init eva: divide A's rows by the square roots of their singular values", "adapter"),
    "eva_adjust_scaling": Flag("--init eva: alpha follows each layer's new rank, so its scale stays alpha / rank",
                               "adapter"),
    "eva_max_batches": Flag("--init eva: batches before an EVA that has not converged stops with an error", "adapter"),
    "loftq_iter": Flag("--init loftq: alternations of quantize and SVD (bits follow --quantize)", "adapter"),
    "targets": Flag("'all-linear', a regex over module names, or a comma list (default all-linear)", "adapter",
                    {"type": parse_targets}),
    "quantize": Flag("quantize the frozen base first (QLoRA with nf4)", "adapter",
                     {"choices": ("none", "int8", "nf4")}),
    "quant_block_size": Flag("nf4: elements per scale block (default 64; 32 or 16 stay closer to the float base)",
                             "adapter"),
    "double_quant": Flag("nf4: store the block scales in 8 bits too", "adapter"),
    "num_layers": Flag("keep only the first N decoder layers of the base", "adapter"),
    "lr": Flag(group="optimization"),
    "weight_decay": Flag(group="optimization"),
    "warmup_ratio": Flag(group="optimization"),
    "max_grad_norm": Flag("clip per adapter (0 disables)", "optimization"),
    "epochs": Flag(group="optimization"),
    "max_steps": Flag("optimizer steps (overrides --epochs)", "optimization"),
    "batch_size": Flag("rows per process per micro-batch", "optimization"),
    "grad_accum": Flag("micro-batches per optimizer step", "optimization"),
    "seed": Flag(group="optimization"),
    "max_length": Flag("tokens per example (or per packed row)", "data"),
    "packing": Flag("pack examples into rows of --max-length tokens", "data"),
    "eval_split": Flag("fraction of distinct examples held out", "data"),
    "skip_bad": Flag("skip malformed records (counted) instead of failing", "data"),
    "eval_every": Flag("steps between evaluations (default: 4 per run; 0: end only)", "run"),
    "log_every": Flag("steps between metrics rows", "run"),
    "save_every": Flag("steps between checkpoints (0: none)", "run"),
    "resume": Flag("continue from OUT/checkpoint (start fresh if none)", "run"),
    "overwrite": Flag("start over in an OUT that holds an earlier run", "run"),
    "device": Flag(DEVICE_HELP, "run", {"type": parse_device}),
    "fsdp": Flag("under torchrun: shard the base and the adapters over the processes (FSDP2) instead of DDP", "run"),
    "bf16": Flag("bf16 compute over fp32 adapter weights (FSDP mixed precision; otherwise autocast)", "run"),
}


def register(sub: argparse._SubParsersAction) -> list[str]:
    p = add_command(sub, __doc__, run_train)
    add_dataclass_flags(p, TrainConfig, FLAGS, skip={"progress": "the common --progress flag"})
    return ["train"]


def run_train(args: argparse.Namespace) -> int:
    from ..train.run import train

    try:
        config = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
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
