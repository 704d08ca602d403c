"""Short accelerator benchmark (the last step of `make gpu-check`): a random Llama (no weights downloaded),
r=8 LoRA on all linear layers, measured in one run and printed as ratios.

    train   one optimizer step (forward + backward + fused AdamW) of loraplex's loss on a (B, T) batch:
            fp32 and bf16 autocast on --device, fp32 on the CPU (fewer steps) for the device/CPU ratio
    decode  runtime.MultiLoraModel.generate: B rows, 4 adapters mixed per row, greedy, fp32 and bf16 weights

    python3 bench/bench_gpu.py                 # cuda when present, else cpu (then the ratios are ~1)
    python3 bench/bench_gpu.py --device cpu --hidden 128 --layers 2 --steps 2   # a quick CPU smoke run

Medians of per-step times; CUDA timings synchronize before reading the clock. Numbers, not asserts.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import loraplex as lp
from loraplex.runtime import MultiLoraModel
from loraplex.device import resolve_device
from loraplex.models import random_llama
from loraplex.train.loop import row_losses


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, steps: int, warmup: int = 2) -> float:
    """Median seconds of fn() over `steps` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_step_time(args, device: torch.device, bf16: bool, steps: int) -> float:
    model = random_llama(hidden=args.hidden, layers=args.layers, vocab=args.vocab, seed=0).to(device)
    lp.inject(model, lp.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"), "a", seed=0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type in ("cpu", "cuda"))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, args.vocab, (args.batch, args.seq), generator=g).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else torch.autocast(device.type, enabled=False)

    def step() -> None:
        with ctx:
            loss = row_losses(model, batch).sum() / ids.numel()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return timed(step, device, steps)


def decode_time(args, device: torch.device, dtype: torch.dtype, folder: Path) -> tuple[float, int]:
    base = random_llama(hidden=args.hidden, layers=args.layers, vocab=args.vocab, seed=0).to(device=device,
                                                                                             dtype=dtype)
    engine = MultiLoraModel(base, device=device)
    names = sorted(d.name for d in folder.iterdir())
    for name in names:
        engine.load(name, folder / name, check_base_model=False)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, args.vocab, (16,), generator=g).tolist() for _ in range(args.batch)]
    rows = [names[i % len(names)] for i in range(args.batch)]
    tokens = args.batch * args.new_tokens
    seconds = timed(lambda: engine.generate(prompts, rows, max_new_tokens=args.new_tokens, eos_token_id=-1),
                    device, max(1, args.steps // 4), warmup=1)
    return seconds, tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--cpu-steps", type=int, default=2, help="CPU reference steps (slow; 0 skips it)")
    p.add_argument("--new-tokens", type=int, default=32)
    args = p.parse_args()
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    print(f"device {device} ({name}); random Llama hidden={args.hidden} layers={args.layers} vocab={args.vocab}, "
          f"r=8 all-linear; torch {torch.__version__}")

    fp32 = train_step_time(args, device, False, args.steps)
    bf16 = train_step_time(args, device, True, args.steps)
    tok = args.batch * args.seq
    print(f"train step (B={args.batch}, T={args.seq}): fp32 {fp32 * 1e3:.1f} ms ({tok / fp32:,.0f} tok/s), "
          f"bf16 autocast {bf16 * 1e3:.1f} ms ({tok / bf16:,.0f} tok/s): bf16/fp32 speed-up {fp32 / bf16:.2f}x")
    if args.cpu_steps and device.type != "cpu":
        cpu = train_step_time(args, torch.device("cpu"), False, args.cpu_steps)
        print(f"train step on cpu fp32 {cpu * 1e3:.1f} ms: {device.type}/cpu speed-up {cpu / fp32:.1f}x (fp32), "
              f"{cpu / bf16:.1f}x (bf16)")

    with tempfile.TemporaryDirectory() as tmp:
        for i in range(4):  # 4 random adapters, saved and loaded like any adapter directory
            m = random_llama(hidden=args.hidden, layers=args.layers, vocab=args.vocab, seed=0)
            lp.inject(m, lp.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False),
                      "a", seed=i)
            lp.save_adapter(m, "a", Path(tmp) / f"ad{i}")
        results = {dt: decode_time(args, device, getattr(torch, dt), Path(tmp)) for dt in ("float32", "bfloat16")}
    (t32, n), (t16, _) = results["float32"], results["bfloat16"]
    print(f"decode ({args.batch} rows x {args.new_tokens} tokens, 4 adapters mixed): fp32 {n / t32:,.0f} tok/s, "
          f"bf16 {n / t16:,.0f} tok/s: bf16/fp32 speed-up {t32 / t16:.2f}x")
    if device.type == "cuda":
        print(f"peak CUDA memory {torch.cuda.max_memory_allocated(device) / 2**20:,.0f} MiB")


if __name__ == "__main__":
    main()
