"""Per-rank memory of `loraplex train` under DDP vs FSDP: the same job launched twice with torchrun, on a
random Llama saved with the tests' character tokenizer (nothing downloaded), r=8 on all linear layers.

Prints, per mode and rank, the peak RSS while loading (and sharding) the base, the peak RSS of the run, the RSS
after training (what the rank holds while it trains: the
full base under DDP, 1/N of it under FSDP) and, on CUDA, the peak CUDA memory, from train_summary.json.

    python3 bench/bench_fsdp.py --nproc 2 --device cpu            # gloo
    python3 bench/bench_fsdp.py --nproc 8 --device cuda           # NCCL, one GPU per rank
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from loraplex.models import random_llama  # noqa: E402
from train_helpers import make_tiny_base, write_data  # noqa: E402  (the tests' tokenizer and data)


def mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f} MiB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--steps", type=int, default=4)
    args = p.parse_args()
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    with tempfile.TemporaryDirectory() as tmp:
        base = make_tiny_base(Path(tmp) / "base")
        model = random_llama(hidden=args.hidden, layers=args.layers, vocab=32000, seed=0)
        params = sum(t.numel() for t in model.parameters())
        model.save_pretrained(base)  # replaces the tiny weights; the tokenizer's ids are < 99 < vocab
        del model
        data = write_data(Path(tmp) / "data")["a"]
        print(f"random Llama hidden={args.hidden} layers={args.layers}: {params / 1e6:.0f}M parameters "
              f"({mib(4 * params)} in fp32); {args.nproc} processes on {args.device}, {args.steps} steps")
        print(f"{'mode':<5} {'rank':>4} {'load peak':>12} {'peak RSS':>12} {'RSS after':>12} {'peak CUDA':>12}")
        for mode in ("ddp", "fsdp"):
            out = Path(tmp) / mode
            cmd = [torchrun, "--standalone", "--nproc-per-node", str(args.nproc), "-m", "loraplex", "train",
                   "--base", str(base), "--data", str(data), "--out", str(out), "--device", args.device,
                   "--max-steps", str(args.steps), "--batch-size", "2", "--max-length", "64", "--eval-split", "0",
                   *(["--fsdp"] if mode == "fsdp" else [])]
            env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
            subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
            for rank, m in enumerate(json.loads((out / "train_summary.json").read_text())["memory_per_rank"]):
                print(f"{mode:<5} {rank:>4} {mib(m['load_peak_rss_bytes']):>12} {mib(m['peak_rss_bytes']):>12} "
                      f"{mib(m['rss_bytes']):>12} "
                      f"{mib(m['peak_cuda_bytes']):>12}")


if __name__ == "__main__":
    main()
