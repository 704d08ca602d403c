"""A quantized base on SmolLM2-135M: bytes, forward speed, and what merging an adapter into it costs.

Base: loraplex.models.load_base("smollm2") (all 30 layers, fp32), 2 CPU threads. Three tables:
    bytes    the whole model and its 210 linear layers (the ones quantize_model replaces; the tied
             embedding / output head stays fp32) at fp32, bf16, int8, nf4, nf4 + double quantization
    speed    forward of a 4x64 batch, logits of the last position only (logits_to_keep=1, as in generation:
             the 49152-word fp32 head, never quantized, would otherwise dilute the difference); "x fp32" is
             the median over repeats of t_fp32 / t_variant within one repeat (variants take turns in a
             rotating order, so load drift hits all alike); "+ lora" rows keep an r=16 all-linear adapter
             on the fly (merge strategy (c))
    merge    quant.compare.compare_merge_strategies with a random but sizeable adapter: r=16, alpha 16, all
             linear layers, A and B random (B non-zero) and B rescaled per layer so ||scale * B @ A||_F =
             --rel * ||W||_F; probe = the built-in sentences, 64-token rows
PEFT is not run beside it: its quantized LoRA needs bitsandbytes on a GPU; this is the CPU path.

    .venv/bin/python bench/bench_quant.py [--reps 7] [--rel 0.05] [--num-layers N] [--skip speed merge]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time

import torch

import loraplex as lp
from loraplex.models import load_base
from loraplex.quant import module_nbytes, quantize_model
from loraplex.quant.compare import (
    DEFAULT_PROBE_TEXTS, compare_merge_strategies, plant_random_adapter, probe_ids_from_texts,
)  # fmt: skip
from loraplex.report import format_table, human_bytes

SCHEMES = {"int8": ("int8", False), "nf4": ("nf4", False), "nf4+dq": ("nf4", True)}
LAST = {"logits_to_keep": 1}  # as in generation: the (fp32, never quantized) 49152-word head on one position


def quantized(base: torch.nn.Module, label: str):
    model = copy.deepcopy(base)
    scheme, dq = SCHEMES[label]
    return model, quantize_model(model, scheme, double_quant=dq)


def bytes_table(base: torch.nn.Module) -> str:
    linear = [m for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]
    lin_fp32 = sum(module_nbytes(m) for m in linear)
    total = module_nbytes(base)
    rows = [["fp32", f"{total:,}", human_bytes(total), "1.000", f"{lin_fp32:,}", "1.000"]]
    bf = copy.deepcopy(base).to(torch.bfloat16)
    rows.append(["bf16", f"{module_nbytes(bf):,}", human_bytes(module_nbytes(bf)), f"{module_nbytes(bf) / total:.3f}",
                 f"{lin_fp32 // 2:,}", "0.500"])  # fmt: skip
    del bf
    for label in SCHEMES:
        model, rep = quantized(base, label)
        rows.append([label, f"{rep.bytes_after:,}", human_bytes(rep.bytes_after), f"{rep.ratio:.3f}",
                     f"{rep.replaced_bytes_after:,}", f"{rep.replaced_bytes_after / rep.replaced_bytes_before:.3f}"])
        del model
    return format_table(rows, ["base", "model bytes", "", "x fp32", "linear-layer bytes", "x fp32"], align="lrrrrr")


def speed_table(base: torch.nn.Module, reps: int) -> str:
    ids = torch.randint(0, base.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
    variants = {"fp32": base, "bf16": copy.deepcopy(base).to(torch.bfloat16)}
    for label in SCHEMES:
        variants[label] = quantized(base, label)[0]
    config = lp.LoraConfig(r=16, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    for label in ("fp32", "int8", "nf4"):
        model = copy.deepcopy(variants[label])
        lp.inject(model, config, "a", seed=0)
        variants[f"{label} + lora"] = model
    times: dict[str, list[float]] = {k: [] for k in variants}
    ratios: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    with torch.inference_mode():
        for m in variants.values():  # warm-up
            m(input_ids=ids, **LAST)
        for rep in range(reps):
            this = {}
            for k in names[rep % len(names):] + names[: rep % len(names)]:  # rotate: no variant always goes first
                t = time.perf_counter()
                variants[k](input_ids=ids, **LAST)
                this[k] = time.perf_counter() - t
                times[k].append(this[k])
            for k in variants:
                ratios[k].append(this["fp32"] / this[k])
    rows = [[k, f"{1000 * statistics.median(times[k]):.0f}", f"{statistics.median(ratios[k]):.2f}"] for k in variants]
    return format_table(rows, ["variant", "ms / forward (median)", "x fp32 (speed)"], align="lrr")


def merge_table(base: torch.nn.Module, tokenizer, rel: float) -> str:
    ids = probe_ids_from_texts(tokenizer, DEFAULT_PROBE_TEXTS, seq_len=64, max_rows=8)
    planted = copy.deepcopy(base)
    plant_random_adapter(planted, "planted", r=16, relative_norm=rel, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        lp.save_adapter(planted, "planted", f"{tmp}/planted")
        del planted
        result = compare_merge_strategies(base, f"{tmp}/planted", ids, tuple(SCHEMES))
    return str(result)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--rel", type=float, default=0.05, help="||delta||_F / ||W||_F of the planted adapter")
    ap.add_argument("--num-layers", type=int, help="only the first N decoder layers (default: all 30)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip", nargs="*", default=[], choices=["bytes", "speed", "merge"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base, tokenizer = load_base("smollm2", num_layers=args.num_layers)
    print(f"$ {' '.join(['python'] + sys.argv)}")
    print(f"base: smollm2, {base.config.num_hidden_layers} layers, {sum(p.numel() for p in base.parameters()):,} "
          f"parameters; torch {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    for name, make in (("bytes", lambda: bytes_table(base)), ("speed", lambda: speed_table(base, args.reps)),
                       ("merge", lambda: merge_table(base, tokenizer, args.rel))):  # fmt: skip
        if name in args.skip:
            continue
        t = time.perf_counter()
        text = make()
        print(f"\n## {name}  ({time.perf_counter() - t:.0f} s)\n{text}", flush=True)


if __name__ == "__main__":
    main()
