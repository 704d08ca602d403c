"""DoRA against plain LoRA, in the multi-adapter runtime and in training, with PEFT's DoRA in the same run.

Runtime (loraplex.runtime.MultiLoraModel; base: a random Llama, hidden 512, 4 layers, vocab 32000, float32,
2 CPU threads; r=8, alpha 16 on every linear layer; N LoRA and N DoRA adapters with random A and B, saved
in PEFT's layout). Scenarios, each timing the bare base, LoRA rows and DoRA rows interleaved:
    single        16x128 prefill, every row one adapter (PEFT's DoRA timed too: set_adapter + forward)
    16 distinct   16x128 prefill, row b adapter b
    64 decode     one decode step of 64 sequences, row b adapter b, KV cache of 32 tokens (cropped back)
Prefills compute the last position's logits only (as generation does). "x base" is the median over repeats of
t_base / t_variant within a repeat; "dora/lora" the median of t_dora / t_lora within a repeat (1.00: DoRA
costs nothing more).
Training: one optimizer step (forward + backward + AdamW) on a 4x128 batch, loraplex LoRA, loraplex DoRA and
PEFT's DoRA (and PEFT's LoRA) over copies of the same base, interleaved; ratios against loraplex LoRA.

    .venv/bin/python bench/bench_dora.py [--reps 9] [--hidden 512 --layers 4 --vocab 32000] [--no-train]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

import torch

import loraplex as lp
from loraplex.models import random_llama
from loraplex.report import format_table
from loraplex.runtime import MultiLoraModel

sys.path.insert(0, str(Path(__file__).parent))
from bench_runtime import ALPHA, LAST, R, write_adapters  # noqa: E402  (sibling scripts)
from bench_runtime_ops import interleaved_times  # noqa: E402


def ratios(times: dict[str, list[float]], ref: str) -> dict[str, float]:
    """Median over repeats of t_ref / t_k within each repeat (> 1: k is faster than ref)."""
    return {k: statistics.median(a / b for a, b in zip(times[ref], v)) for k, v in times.items()}


def row(label: str, times: dict[str, list[float]]) -> list[str]:
    x_base = ratios(times, "base")
    dora_lora = statistics.median(d / lo for d, lo in zip(times["dora"], times["lora"]))
    peft = f"{statistics.median(times['peft-dora']) * 1e3:.2f} ms" if "peft-dora" in times else "-"
    return [label, *(f"{statistics.median(times[k]) * 1e3:.2f} ms" for k in ("base", "lora", "dora")), peft,
            f"{x_base['lora']:.2f}", f"{x_base['dora']:.2f}", f"{dora_lora:.2f}"]


@torch.inference_mode()
def bench_runtime(base: torch.nn.Module, root: Path, n: int, reps: int, prefill: tuple[int, int],
                  decode: tuple[int, int]) -> str:
    lora_dirs = write_adapters(base, root / "lora", n)
    dora_dirs = write_adapters(base, root / "dora", n, use_dora=True)
    engine = MultiLoraModel(copy.deepcopy(base))
    for i in range(n):
        engine.load(f"l{i}", lora_dirs[i])
        engine.load(f"d{i}", dora_dirs[i])
    from peft import PeftModel

    peft_dora = PeftModel.from_pretrained(copy.deepcopy(base), str(dora_dirs[0])).eval()
    gen = torch.Generator().manual_seed(0)
    vocab = base.config.vocab_size
    rows = []
    B, T = prefill
    ids = torch.randint(3, vocab, (B, T), generator=gen)
    for label, k in (("single", 1), (f"{min(16, n)} distinct", min(16, n))):
        lora = [f"l{b % k}" for b in range(B)]
        dora = [f"d{b % k}" for b in range(B)]
        fns = {"base": lambda: base(ids, **LAST), "lora": lambda: engine.forward(ids, adapters=lora, **LAST),
               "dora": lambda: engine.forward(ids, adapters=dora, **LAST)}
        if k == 1:
            fns["peft-dora"] = lambda: peft_dora(input_ids=ids, **LAST)
        rows.append(row(f"{label} {B}x{T}", interleaved_times(fns, reps, 0.05)))
    rows.append(row(f"{decode[0]} decode", _decode(base, engine, n, decode, reps, gen)))
    return format_table(rows, ["scenario", "base", "LoRA", "DoRA", "PEFT DoRA", "LoRA x base", "DoRA x base",
                               "dora/lora"])


def _decode(base, engine: MultiLoraModel, n: int, shape: tuple[int, int], reps: int, gen) -> dict[str, list[float]]:
    from transformers import DynamicCache

    B, T = shape
    ids, step = (torch.randint(3, base.config.vocab_size, s, generator=gen) for s in ((B, T), (B, 1)))
    batches = {"lora": engine.batch([f"l{b % n}" for b in range(B)]),
               "dora": engine.batch([f"d{b % n}" for b in range(B)])}
    calls = {"base": base, **batches}
    caches = {k: DynamicCache(config=base.config) for k in calls}
    for k, call in calls.items():
        call(input_ids=ids, past_key_values=caches[k], use_cache=True)

    def run(call, cache):
        def f():
            call(input_ids=step, past_key_values=cache, use_cache=True)
            cache.crop(-1)  # back to T cached tokens
        return f

    try:
        return interleaved_times({k: run(c, caches[k]) for k, c in calls.items()}, reps, 0.05)
    finally:
        for b in batches.values():
            b.close()


def bench_train(base: torch.nn.Module, reps: int, shape: tuple[int, int]) -> str:
    import peft

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, base.config.vocab_size, shape, generator=gen)
    models = {}
    for dora in (False, True):
        ours = copy.deepcopy(base)
        lp.inject(ours, lp.LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear", use_dora=dora), "x")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=R, lora_alpha=ALPHA, use_dora=dora,
                                                                          target_modules="all-linear"))
        models["lp " + ("dora" if dora else "lora")] = ours.train()
        models["peft " + ("dora" if dora else "lora")] = theirs.train()

    def step(model):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)

        def f():
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return f

    times = interleaved_times({k: step(m) for k, m in models.items()}, reps, 0.2)
    vs = ratios(times, "lp lora")
    rows = [[k, f"{statistics.median(v) * 1e3:.1f} ms", f"{1 / vs[k]:.2f}"] for k, v in times.items()]
    dora_vs_peft = statistics.median(a / b for a, b in zip(times["peft dora"], times["lp dora"]))
    return (format_table(rows, ["train step", "median", "time / loraplex LoRA"])
            + f"\nPEFT DoRA step / loraplex DoRA step: {dora_vs_peft:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--adapters", type=int, default=64, help="LoRA adapters, and as many DoRA ones")
    ap.add_argument("--prefill", default="16x128", help="rows x tokens of the prefill scenarios")
    ap.add_argument("--decode", default="64x32", help="sequences x cached tokens of the decode scenario")
    ap.add_argument("--train-batch", default="4x128", help="rows x tokens of a training step")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-train", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    shape = {k: tuple(int(v) for v in getattr(args, k).split("x")) for k in ("prefill", "decode", "train_batch")}
    base = random_llama(hidden=args.hidden, layers=args.layers, vocab=args.vocab).eval()
    print(f"base: {base.config.name_or_path}, float32, {args.threads} threads; r={R}, alpha={ALPHA}, all-linear")
    with tempfile.TemporaryDirectory() as tmp:
        print(bench_runtime(base, Path(tmp), args.adapters, args.reps, shape["prefill"], shape["decode"]))
    if not args.no_train:
        print(bench_train(base, args.reps, shape["train_batch"]))


if __name__ == "__main__":
    main()
