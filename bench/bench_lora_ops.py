"""Micro-benchmark of the pieces behind loraplex's training fast path, at SmolLM2 training sizes.

    .venv/bin/python bench/bench_lora_ops.py [--rows 204] [--reps 200]

1. The skinny products of a LoRA backward (r=8), each in the layout PEFT / autograd uses and in the one
   functional.linear_with_lora uses:  dy @ B  vs  dy @ (B.T row-major).T,   dy.T @ h  vs  (h.T @ dy).T.
2. One LoRA linear, forward + backward: the one-node path (fused=True) vs the generic path (fused=False)
   vs the frozen base alone (what the LoRA path adds on top).
3. AdamW over SmolLM2's 420 adapter tensors (r=8, all linear layers): the for-loop version vs fused.
4. The output head + cross-entropy on the target rows (forward + backward; SmolLM2: vocab 49,152, hidden 576):
   head(x) = x @ W.T  vs  loop.head_logits = (W @ x.T).T.
Variants take turns within each repetition; the table shows medians (and the minimum, less sensitive to
the machine's noise).
"""

from __future__ import annotations

import argparse
import statistics
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench_runtime_ops import interleaved_times  # sibling script: bench/ is on sys.path
from loraplex.layers import LoraLinear
from loraplex.report import format_table
from loraplex.train.loop import head_logits

SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576)]  # (in, out) of SmolLM2's projections
RANK = 8


def timed(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, tuple[float, float]]:
    """{name: (median s, min s)} of one call each, the variants interleaved in every repetition."""
    return {k: (statistics.median(v), min(v)) for k, v in interleaved_times(fns, reps, budget_s=0.0).items()}


def us(t: float) -> str:
    return f"{t * 1e6:,.0f}"


def products(rows: int, reps: int) -> list[list[str]]:
    out = []
    for d_in, d_out in SHAPES:
        g, h = torch.randn(rows, d_out), torch.randn(rows, RANK)
        b = torch.randn(d_out, RANK)
        t = timed({"dy @ B": lambda: torch.mm(g, b),
                   "dy @ rowmajor(B.T).T": lambda: torch.mm(g, b.t().clone(memory_format=torch.contiguous_format).t()),
                   "dy.T @ h": lambda: torch.mm(g.t(), h),
                   "(h.T @ dy).T": lambda: torch.mm(h.t(), g).t().contiguous()}, reps)
        out.append([f"{d_in}->{d_out}", us(t["dy @ B"][0]), us(t["dy @ rowmajor(B.T).T"][0]),
                    f"{t['dy @ B'][0] / t['dy @ rowmajor(B.T).T'][0]:.2f}x", us(t["dy.T @ h"][0]),
                    us(t["(h.T @ dy).T"][0]), f"{t['dy.T @ h'][0] / t['(h.T @ dy).T'][0]:.2f}x"])
    return out


def layers(rows: int, reps: int) -> list[list[str]]:
    out = []
    for d_in, d_out in SHAPES:
        made = {}
        for fused in (True, False):
            base = nn.Linear(d_in, d_out, bias=False).requires_grad_(False)
            layer = LoraLinear(base)
            layer.add_adapter("a", RANK, 2.0 * RANK, init=False)
            layer.active = [("a", 1.0)]
            layer.fused = fused
            made[fused] = layer
        made[False].load_state_dict(made[True].state_dict())
        x = torch.randn(4, rows // 4, d_in, requires_grad=True)
        dy = torch.randn(4, rows // 4, d_out)
        t = timed({"one node": lambda: made[True](x).backward(dy), "generic": lambda: made[False](x).backward(dy),
                   "base alone": lambda: made[True].base_layer(x).backward(dy)}, reps)
        base = t["base alone"]
        out.append([f"{d_in}->{d_out}", us(base[0]), us(t["one node"][0] - base[0]), us(t["generic"][0] - base[0]),
                    us(t["one node"][1] - base[1]), us(t["generic"][1] - base[1])])
    return out


def adamw(reps: int) -> list[list[str]]:
    shapes = [s for _ in range(30) for d_in, d_out in [(576, 576), (576, 192), (576, 192), (576, 576),
                                                       (576, 1536), (576, 1536), (1536, 576)]
              for s in ((RANK, d_in), (d_out, RANK))]
    made = {}
    for name, kw in (("for-loop", {"foreach": False}), ("foreach", {"foreach": True}), ("fused", {"fused": True})):
        params = [nn.Parameter(torch.randn(s)) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p)
        made[name] = torch.optim.AdamW(params, lr=1e-3, **kw)
    t = timed({k: opt.step for k, opt in made.items()}, reps)
    return [[k, len(shapes), f"{v[0] * 1e3:.1f}", f"{v[0] / t['fused'][0]:.1f}x"] for k, v in t.items()]


def head(reps: int) -> list[list[str]]:
    lin = nn.Linear(576, 49152, bias=False).requires_grad_(False)  # SmolLM2's (tied, frozen) output head
    out = []
    for rows in (58, 120):  # target tokens of a batch of 4 (chatterbot:tech_support: ~50-60)
        x = torch.randn(rows, 576, requires_grad=True)
        labels = torch.randint(0, lin.out_features, (rows,))
        t = timed({"x @ W.T": lambda: F.cross_entropy(lin(x), labels).backward(),
                   "(W @ x.T).T": lambda: F.cross_entropy(head_logits(lin, x), labels).backward()}, reps)
        out.append([rows, f"{t['x @ W.T'][0] * 1e3:.1f}", f"{t['(W @ x.T).T'][0] * 1e3:.1f}",
                    f"{t['x @ W.T'][0] / t['(W @ x.T).T'][0]:.2f}x"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=204, help="tokens per micro-batch (SmolLM2, batch 4: ~200)")
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rows} rows, r={RANK}\n")
    print("1. skinny products of the LoRA backward (median us)")
    print(format_table(products(args.rows, args.reps),
                       ["layer", "dy @ B", "dy @ rowmajor(B.T).T", "speed-up", "dy.T @ h", "(h.T @ dy).T", "speed-up"]))
    print("\n2. one LoRA linear, forward + backward: what LoRA adds to the frozen base (us; median, then min)")
    print(format_table(layers(args.rows, max(20, args.reps // 4)),
                       ["layer", "base alone", "+ one node", "+ generic", "+ one node (min)", "+ generic (min)"]))
    print("\n3. AdamW step over SmolLM2's adapter tensors (r=8, all linear)")
    print(format_table(adamw(max(10, args.reps // 10)), ["AdamW", "tensors", "median ms", "time / fused"]))
    print("\n4. output head + cross-entropy on the target rows, forward + backward (median ms)")
    print(format_table(head(max(10, args.reps // 10)), ["rows", "x @ W.T", "(W @ x.T).T", "speed-up"]))


if __name__ == "__main__":
    main()
