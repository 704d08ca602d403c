"""Training benchmark on SmolLM2-135M-Instruct + chatterbot:tech_support, r=8 on all linear layers.

Six variants, all from the same initial adapter, batches, AdamW, warmup + cosine schedule and clipping:
    loraplex   loraplex.inject(...) + loraplex's loop (loraplex.train.Trainer)   the path under test
    loraplex-generic  the same with every LoRA layer on its generic path (fused=False: base module, then the
               addmm LoRA path), the reference of the one-node fast path (functional.linear_with_lora)
    peft       peft.get_peft_model(...) + loraplex's loop: isolates the LoRA layers (A/B copied from loraplex's
               initial adapter, so both start equal)
    peft-hf    the same PEFT model trained the way transformers users do: model(**batch, labels=...).loss
               (full (B, T, vocab) logits and transformers' loss), same optimizer, schedule and clipping
    full       full fine-tuning of the same model through loraplex's loop (every parameter trainable)
    floor      no LoRA at all: the frozen base with one trainable scalar on the embeddings' output, so backward
               runs every layer's input gradient. No LoRA implementation in this loop can be faster, so
               floor / peft bounds what any LoRA layer can gain over PEFT's (everything else being equal).
Steps are interleaved (step i of every variant before step i+1 of any, the order rotating each round),
so machine noise hits all alike; the table reports medians of the per-step times and of their paired ratios
(with a 90% bootstrap interval of that median over the steps), and the ratio of the measured steps' total
time (what a whole run waits for).
Peak RSS is measured in a fresh subprocess per variant (load + a few steps), since a process's peak
never goes down.

    .venv/bin/python bench/bench_train.py --steps 30 --batch-size 4
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import loraplex as lp
from loraplex.models import load_base
from loraplex.report import format_table, human_bytes
from loraplex.train import Job, Trainer, TrainConfig, adapter_params, load_records, split, tokenize
from loraplex.train.run import peak_rss_bytes

VARIANTS = ("loraplex", "loraplex-generic", "peft", "peft-hf", "full", "floor")
DATA = "chatterbot:tech_support"


def settings(args, variant: str) -> TrainConfig:
    lr = args.full_lr if variant == "full" else args.lr
    return TrainConfig(base="smollm2", data=[DATA], out=tempfile.gettempdir(), rank=8, alpha=16, dropout=0.0,
                       lr=lr, max_steps=args.steps, batch_size=args.batch_size, max_length=256,
                       eval_split=args.eval_split, seed=0, progress=False)


def examples(tokenizer, cfg: TrainConfig):
    return split(tokenize(load_records(DATA), tokenizer, max_length=cfg.max_length), cfg.eval_split, cfg.seed)


def build(variant: str, args) -> tuple[Trainer, Job, int]:
    """A Trainer over one Job for `variant`; also returns its trainable parameter count."""
    cfg = settings(args, variant)
    model, tok = load_base("smollm2")
    train_set, eval_set = examples(tok, cfg)
    lora = lp.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules="all-linear")
    if variant in ("loraplex", "loraplex-generic"):
        lp.inject(model, lora, "default", seed=cfg.seed)
        params = adapter_params(model, "default")
        for _, layer in lp.lora_layers(model):
            layer.fused = variant == "loraplex"
    elif variant in ("peft", "peft-hf"):
        import peft

        reference, _ = load_base("smollm2")  # the same initial A/B as the loraplex variant
        lp.inject(reference, lora, "default", seed=cfg.seed)
        pm = peft.get_peft_model(model, peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0,
                                                        target_modules="all-linear"))
        model = pm.get_base_model()  # PEFT injects in place; the loop drives the transformers model
        copied = 0
        with torch.no_grad():
            for key, layer in lp.lora_layers(reference):
                a, b = layer.adapter_tensors("default")
                target = model.get_submodule(key)
                target.lora_A["default"].weight.copy_(a)
                target.lora_B["default"].weight.copy_(b)
                copied += 1
        del reference
        params = [p for p in model.parameters() if p.requires_grad]
        assert copied * 2 == len(params), (copied, len(params))
    elif variant == "floor":
        model.requires_grad_(False)
        gate = torch.nn.Parameter(torch.ones(()))  # (): d(loss)/d(gate) needs the input gradient of every layer
        model.get_input_embeddings().register_forward_hook(lambda module, args, out: out * gate)
        params = [gate]
    else:
        for p in model.parameters():
            p.requires_grad_(True)
        params = list(model.parameters())
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    job = Job(variant, params, train_set, eval_set, cfg, 1, pad)
    return Trainer(model, [job], cfg, pad_id=pad), job, sum(p.numel() for p in params)


def hf_step(trainer: Trainer, job: Job) -> dict[str, float]:
    """One optimizer step as a PEFT + transformers user writes it: the model's own loss over full logits
    (mean over the target tokens, the same quantity as loraplex's loss), then clip, AdamW, schedule."""
    batch = job.next_micro()
    for p in job.params:
        p.grad = None
    trainer.model.train()
    loss = trainer.model(**batch, use_cache=False).loss  # transformers shifts the labels itself
    loss.backward()
    torch.nn.utils.clip_grad_norm_(job.params, trainer.config.max_grad_norm)
    job.optimizer.step()
    job.scheduler.step()
    job.steps_done += 1
    tokens = int(batch["attention_mask"].sum())
    return {"loss": loss.item(), "tokens": tokens}


def step(variant: str, trainer: Trainer, job: Job) -> dict[str, float]:
    return hf_step(trainer, job) if variant == "peft-hf" else trainer.train_step()[job.name]


def rss_only(variant: str, args) -> None:
    trainer, job, _ = build(variant, args)
    loaded = peak_rss_bytes()
    torch.manual_seed(0)
    for _ in range(args.rss_steps):
        step(variant, trainer, job)
    print(json.dumps({"variant": variant, "peak_rss": peak_rss_bytes(), "after_load": loaded}))


def peak_rss(names: list[str], args) -> dict[str, dict[str, int]]:
    """Peak RSS of each variant, each in a fresh process (a peak never goes down): load + rss_steps steps."""
    rss = {}
    for v in names:
        out = subprocess.run([sys.executable, __file__, "--rss-only", v, "--batch-size", str(args.batch_size),
                              "--rss-steps", str(args.rss_steps), "--eval-split", str(args.eval_split)],
                             capture_output=True, text=True, check=True)
        rss[v] = json.loads(out.stdout.strip().splitlines()[-1])
    return rss


def paired_ratio(num: list[float], den: list[float], skip: int) -> float:
    """Median over steps (after the first `skip`) of num[i] / den[i]: two variants' times for the same step."""
    return statistics.median(a / b for a, b in zip(num[skip:], den[skip:]))


def paired_ratio_ci(num: list[float], den: list[float], skip: int, level: float = 0.9,
                    draws: int = 2000) -> tuple[float, float]:
    """Percentile-bootstrap interval (steps resampled with replacement, fixed seed) of `paired_ratio`: how far
    the median could move on this machine's step-to-step noise alone."""
    ratios = [a / b for a, b in zip(num[skip:], den[skip:])]
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(draws))
    tail = (1 - level) / 2
    return medians[int(tail * (draws - 1))], medians[int((1 - tail) * (draws - 1))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--full-lr", type=float, default=2e-5)
    ap.add_argument("--eval-split", type=float, default=0.2)
    ap.add_argument("--rss-steps", type=int, default=4)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--rss-only", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--memory-only", action="store_true", help="only the peak-RSS table (no step timing)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.rss_only:
        return rss_only(args.rss_only, args)
    names = args.variants.split(",")
    if args.memory_only:
        rss = peak_rss(names, args)
        ref = "loraplex" if "loraplex" in names else names[0]
        print(format_table([[v, human_bytes(r["after_load"]), human_bytes(r["peak_rss"]),
                             f"{r['peak_rss'] / rss[ref]['peak_rss']:.2f}x"] for v, r in rss.items()],
                           ["variant", "RSS after load", f"peak RSS ({args.rss_steps} steps)", f"peak / {ref}"]))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {DATA}; r=8 all-linear, dropout 0; "
          f"batch {args.batch_size}, {args.steps} steps", flush=True)
    runs = {v: build(v, args) for v in names}
    before = {v: t.evaluate(j) for v, (t, j, _) in runs.items()}
    times: dict[str, list[float]] = {v: [] for v in names}
    losses: dict[str, list[float]] = {v: [] for v in names}
    tokens: dict[str, list[int]] = {v: [] for v in names}
    for i in range(args.steps):
        order = names[i % len(names):] + names[:i % len(names)]
        for v in order:
            trainer, job, _ = runs[v]
            torch.manual_seed(i)
            start = time.perf_counter()
            stats = step(v, trainer, job)
            times[v].append(time.perf_counter() - start)
            losses[v].append(stats["loss"])
            tokens[v].append(stats["tokens"])
        print(f"step {i + 1}: " + "  ".join(f"{v} {losses[v][-1]:.4f} ({times[v][-1]:.2f} s)" for v in names),
              flush=True)
    after = {v: t.evaluate(j) for v, (t, j, _) in runs.items()}
    del runs
    rss = peak_rss(names, args)
    skip = 2  # the first steps warm allocators and caches
    med = {v: statistics.median(times[v][skip:]) for v in names}
    ref = "loraplex" if "loraplex" in names else names[0]
    rows = [[v, f"{med[v]:.3f}", f"{statistics.median(tokens[v]) / med[v]:,.0f}", f"{med[v] / med[ref]:.2f}x",
             f"{before[v]:.4f}", f"{after[v]:.4f}", human_bytes(rss[v]["peak_rss"]),
             f"{rss[v]['peak_rss'] / rss[ref]['peak_rss']:.2f}x"] for v in names]
    print()
    print(format_table(rows, ["variant", "median step s", "tokens/s", f"time / {ref}", "eval before", "eval after",
                              "peak RSS", f"RSS / {ref}"]))
    result = {"args": vars(args), "median_step_s": med, "eval_before": before, "eval_after": after, "rss": rss,
              "losses": losses, "times": times}
    if "loraplex" in names:
        targets = {"peft": ">= 1.2x", "peft-hf": ">= 1.2x", "full": ">= 1.35x", "floor": "(bound)"}
        lines = []
        for v in names:
            if v == "loraplex":
                continue
            paired = paired_ratio(times[v], times["loraplex"], skip)
            low, high = paired_ratio_ci(times[v], times["loraplex"], skip)
            total = sum(times[v][skip:]) / sum(times["loraplex"][skip:])  # the wall time of the measured steps
            gap = max(abs(a - b) for a, b in zip(losses["loraplex"], losses[v]))
            lines.append([v, f"{paired:.2f}x", f"{low:.2f}-{high:.2f}x", f"{total:.2f}x", targets.get(v, "-"),
                          f"{rss['loraplex']['peak_rss'] / rss[v]['peak_rss']:.2f}x",
                          "<= 0.8x" if v == "full" else "-",
                          {"full": "(other lr)", "floor": "(no LoRA)"}.get(v, f"{gap:.2e}")])
            result.setdefault("speedup", {})[v] = paired
            result.setdefault("speedup_ci90", {})[v] = [low, high]
            result.setdefault("total_time_ratio", {})[v] = total
            result.setdefault("max_loss_gap", {})[v] = gap
        print()
        print(format_table(lines, ["vs", "loraplex speed-up (median of paired step ratios)", "90% bootstrap",
                                   "(total time)", "target",
                                   "peak RSS loraplex / vs", "target", "max |train loss diff|"]))
        if "floor" in names:
            over = {v: paired_ratio(times[v], times["floor"], skip) for v in names if v not in ("floor", "full")}
            result["over_floor"] = over
            print("\nstep time over the no-LoRA floor (median of paired ratios): "
                  + ", ".join(f"{v} {x:.3f}x" for v, x in over.items()))
            if "peft" in over:
                print(f"a LoRA layer costing nothing would make this loop {over['peft']:.2f}x faster than with "
                      f"PEFT's layers (the bound on 'loraplex vs peft')")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
