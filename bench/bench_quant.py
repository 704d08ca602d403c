"""Quantized SmolLM2 base: bytes, forward speed, perplexity, QLoRA vs LoRA, and merging into int8 / NF4.

Sections (each can be skipped with --skip): bytes of the base per scheme; forward speed vs fp32
(interleaved medians); train: LoRA on the fp32 base and QLoRA on NF4 bases (block 64; block 32 and 16 with
double-quantized scales) with the same data (chatterbot:ai), seed and steps, eval loss on the held-out
split; ppl: perplexity of each base alone and with the LoRA / block-64 QLoRA adapters; merge: requantize
vs from_original vs on the fly, for a random and for the trained adapter.

    .venv/bin/python bench/bench_quant.py [--steps 24] [--seed 0] [--skip bytes speed ppl merge] [--train-runs nf4]
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import loraplex as lp
from loraplex.models import load_base
from loraplex.quant import module_nbytes, quantize_model
from loraplex.quant.compare import (
    DEFAULT_PROBE_TEXTS, compare_merge_strategies, plant_random_adapter, probe_ids_from_texts,
)  # fmt: skip
from loraplex.report import format_table, human_bytes
from loraplex.train import Batcher, TrainConfig, load_records, row_losses, split, tokenize, train
from loraplex.train.data import IGNORE_INDEX, Example

SCHEMES = {"int8": ("int8", False), "nf4": ("nf4", False), "nf4+dq": ("nf4", True)}
LAST = {"logits_to_keep": 1}  # as in generation: the (fp32, never quantized) 49152-word head on one position
DATA = "chatterbot:ai"  # 105 distinct question/answer pairs, ~48 tokens each
TRAIN = dict(rank=8, alpha=16.0, lr=1e-3, batch_size=8, max_length=128, eval_split=0.2, eval_every=0, seed=0,
             progress=False)


def quantized(base: torch.nn.Module, label: str):
    model = copy.deepcopy(base)
    scheme, dq = SCHEMES[label]
    return model, quantize_model(model, scheme, double_quant=dq)


def variant(base: torch.nn.Module, label: str) -> torch.nn.Module:
    """A fresh copy of `base` as variant `label`: fp32, bf16 or a key of SCHEMES."""
    if label == "fp32":
        return copy.deepcopy(base)
    if label == "bf16":
        return copy.deepcopy(base).to(torch.bfloat16)
    return quantized(base, label)[0]


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


# ---------------------------------------------------------------------------------------- train and ppl
# (label, out sub-directory, TrainConfig quantization fields, bits per quantized weight incl. scales)
TRAIN_RUNS = (
    ("LoRA (fp32 base)", "none", dict(quantize="none"), 32.0),
    ("QLoRA (nf4, block 64)", "nf4", dict(quantize="nf4"), 4 + 32 / 64),
    ("QLoRA (nf4, block 32, double quant)", "nf4-b32dq", dict(quantize="nf4", quant_block_size=32, double_quant=True),
     4 + 8 / 32),
    ("QLoRA (nf4, block 16, double quant)", "nf4-b16dq", dict(quantize="nf4", quant_block_size=16, double_quant=True),
     4 + 8 / 16),
)


def train_both(base_spec: str, num_layers, steps: int, out: Path, runs: list[str]) -> tuple[dict[str, Path], str]:
    """Train LoRA (fp32 base) and QLoRA (the nf4 bases of TRAIN_RUNS named in `runs`) with the same settings;
    their dirs and a table."""
    rows, dirs, after = [], {}, {}
    chosen = [r for r in TRAIN_RUNS if r[1] == "none" or r[1] in runs]
    for label, sub, quant, bits in chosen:
        t = time.perf_counter()
        res = train(TrainConfig(base=base_spec, data=[DATA], out=out / sub, max_steps=steps, num_layers=num_layers,
                                **quant, **TRAIN))
        dirs[sub] = res.out
        after[sub] = res.eval_loss_after["default"]
        s = res.summary
        gap = "" if sub == "none" else f"{100 * (after[sub] - after['none']) / after['none']:+.2f}%"
        rows.append([label, f"{bits:.2f}", res.steps, f"{res.eval_loss_before['default']:.4f}", f"{after[sub]:.4f}",
                     gap, f"{s['tokens_per_s']:,.0f}", f"{time.perf_counter() - t:.0f}"])
    table = format_table(rows, ["run", "bits/weight", "steps", "eval loss before", "eval loss after",
                                "vs LoRA", "train tokens/s", "s"], align="lrrrrrrr")
    verdicts = [f"{label}: {'within' if abs(after[sub] - after['none']) <= 0.02 * after['none'] else 'OUTSIDE'}"
                for label, sub, _, _ in chosen[1:]]
    return dirs, f"{table}\nQLoRA vs LoRA eval loss, target within 2%: " + "; ".join(verdicts)


def held_out(tokenizer) -> list[Example]:
    """The held-out examples of DATA exactly as `train` splits them (same tokenization, fraction and seed)."""
    examples = tokenize(load_records(DATA), tokenizer, max_length=TRAIN["max_length"])
    return split(examples, TRAIN["eval_split"], TRAIN["seed"])[1]


@torch.no_grad()
def heldout_ppl(model: torch.nn.Module, examples: list[Example], pad_id: int) -> float:
    """exp(mean next-token loss over the target tokens of `examples`), as train's eval loss."""
    loss = count = 0.0
    for batch in Batcher(examples, 8, seed=0, shuffle=False, pad_id=pad_id):
        loss += float(row_losses(model, batch).double().sum())
        count += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return math.exp(loss / count)


@torch.no_grad()
def text_ppl(model: torch.nn.Module, ids: torch.Tensor) -> float:
    """exp(mean next-token loss) over every position of the probe rows ids (B, T)."""
    logits = model(input_ids=ids).logits.float()  # (B, T, V)
    return math.exp(float(F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())))


def ppl_table(base: torch.nn.Module, tokenizer, dirs: dict[str, Path]) -> str:
    examples = held_out(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    text = probe_ids_from_texts(tokenizer, DEFAULT_PROBE_TEXTS, seq_len=64, max_rows=8)
    rows = []
    for label in ("fp32", "bf16", *SCHEMES):
        model = variant(base, label)
        row = [label, f"{text_ppl(model, text):.2f}", f"{heldout_ppl(model, examples, pad_id):.3f}"]
        for name, directory in (("lora", dirs["none"]), ("qlora", dirs["nf4"])):
            lp.load_adapter(model, directory, name, check_base_model=False, activate=False)
        for name in ("lora", "qlora"):
            lp.set_active(model, name)
            row.append(f"{heldout_ppl(model, examples, pad_id):.3f}")
        rows.append(row)
        del model
    headers = ["base", "base alone: text", "base alone: held-out", "+LoRA: held-out", "+QLoRA: held-out"]
    return (f"held-out: {len(examples)} chatterbot:ai answers; text: {tuple(text.shape)} probe tokens\n"
            + format_table(rows, headers, align="lrrrr"))


# ------------------------------------------------------------------------------------------------ merge
def heldout_probe(tokenizer, rows: int = 8, seq_len: int = 64) -> torch.Tensor:
    """The held-out conversations (prompt and answer tokens) joined and cut into (rows, seq_len) ids."""
    flat = [t for e in held_out(tokenizer) for t in e.input_ids]
    rows = min(rows, len(flat) // seq_len)
    return torch.tensor(flat[: rows * seq_len], dtype=torch.long).view(rows, seq_len)


def merge_tables(base: torch.nn.Module, tokenizer, rel: float, trained: Path | None) -> str:
    out = []
    if trained is not None:
        result = compare_merge_strategies(base, trained, heldout_probe(tokenizer), tuple(SCHEMES))
        out.append(f"### trained LoRA adapter ({DATA}), probe: its held-out conversations\n{result}")
    ids = probe_ids_from_texts(tokenizer, DEFAULT_PROBE_TEXTS, seq_len=64, max_rows=8)
    planted = copy.deepcopy(base)
    plant_random_adapter(planted, "planted", r=16, relative_norm=rel, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        lp.save_adapter(planted, "planted", f"{tmp}/planted")
        del planted
        result = compare_merge_strategies(base, f"{tmp}/planted", ids, tuple(SCHEMES))
    out.append(f"### random adapter, ||delta|| = {rel} ||W|| per layer, probe: the built-in sentences\n{result}")
    return "\n\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=24, help="optimizer steps of each training run")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rel", type=float, default=0.05, help="||delta||_F / ||W||_F of the random adapter")
    ap.add_argument("--num-layers", type=int, help="only the first N decoder layers (default: all 30)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-runs", default=",".join(r[1] for r in TRAIN_RUNS[1:]),
                    help="QLoRA runs of the train section besides LoRA (default: all of %(default)s; "
                         "'nf4' is needed by the ppl section)")
    ap.add_argument("--seed", type=int, default=0, help="training seed (adapter init, data order, eval split)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["bytes", "speed", "train", "ppl", "merge"],
                    help="train also drives ppl and the trained adapter's merge table")
    args = ap.parse_args()
    TRAIN["seed"] = args.seed  # also the held-out split of the ppl section
    torch.set_num_threads(args.threads)
    base, tokenizer = load_base("smollm2", num_layers=args.num_layers)
    print(f"$ {' '.join(['python'] + sys.argv)}")
    print(f"base: smollm2, {base.config.num_hidden_layers} layers, {sum(p.numel() for p in base.parameters()):,} "
          f"parameters; torch {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        dirs: dict[str, Path] = {}

        def run_train() -> str:
            table = train_both("smollm2", args.num_layers, args.steps, Path(tmp), args.train_runs.split(","))
            dirs.update(table[0])
            return table[1]

        sections = (("bytes", "bytes", lambda: bytes_table(base)),
                    ("speed", "speed", lambda: speed_table(base, args.reps)),
                    ("train", "train: QLoRA vs LoRA", run_train),
                    ("ppl", "ppl", lambda: ppl_table(base, tokenizer, dirs)),
                    ("merge", "merge", lambda: merge_tables(base, tokenizer, args.rel, dirs.get("none"))))
        for key, title, make in sections:
            if key in args.skip or (key == "ppl" and "train" in args.skip):  # ppl reads the trained adapters
                continue
            t = time.perf_counter()
            text = make()
            print(f"\n## {title}  ({time.perf_counter() - t:.0f} s)\n{text}", flush=True)


if __name__ == "__main__":
    main()
