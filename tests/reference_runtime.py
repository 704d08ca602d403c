"""The obvious slow multi-adapter LoRA: a Python loop over rows and their (slot, weight) pairs.

The oracle for loraplex.runtime.ops; it calls the single-adapter math in loraplex.functional and nothing else:
    y[b] += sum_k w_k * lora_linear(x[b], A[s_k], B[s_k], scale[s_k])
with, for a LoRA-B bias slot (bias[s] = b): y[b] += w_k * scale[s_k] * b (PEFT's scale * (B A x + b)),
then, for a row holding a DoRA slot d with [g; c] = rescale[d]:  y[b] = g * y[b] + c
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from loraplex.functional import lora_embedding, lora_linear


def lora_rows_ref(
    y: torch.Tensor,
    x: torch.Tensor,
    adapters: Mapping[int, tuple[torch.Tensor, torch.Tensor, float] | None],
    assignments: Sequence[int | Sequence[tuple[int, float]]],
    rescale: Mapping[int, torch.Tensor] | None = None,
    bias: Mapping[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Return a new y: y_out[b] = y[b] + sum over row b's (slot, weight) of w * lora_linear(x[b], A, B, scale).

    x: (B, L, in), y: (B, L, out); assignments[b] is a slot (-1 = base only) or a list of (slot, weight);
    adapters[slot] = (A (r, in), B (out, r), scale), or None when that slot has no LoRA on this layer;
    rescale[slot] = [g; c] (2, out) for DoRA slots; bias[slot] = b (out,) for LoRA-B bias slots.
    """
    out = y.clone()
    for b, a in enumerate(assignments):
        pairs = ([] if a == -1 else [(a, 1.0)]) if isinstance(a, int) else list(a)
        for slot, w in pairs:
            t = adapters[slot]
            if t is None:
                continue
            A, B, scale = t
            out[b] = out[b] + w * lora_linear(x[b], A, B, scale)
            if bias and slot in bias:
                out[b] = out[b] + w * scale * bias[slot]
        for slot, _ in pairs:
            if rescale and slot in rescale and adapters[slot] is not None:
                out[b] = rescale[slot][0] * out[b] + rescale[slot][1]
    return out


def random_layer(gen: torch.Generator, rows: int, L: int, fin: int, fout: int
                 ) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor, float] | None], torch.Tensor, torch.Tensor]:
    """Random inputs of `lora_rows_ref` for one layer (in fin, out fout), drawn from `gen` in this order:
    adapters for slots 0, 1, 2 of rank 2, 3, 1 and scale 0.5 + slot, slot 3 with no LoRA on the layer (None);
    then x (rows, L, fin) and y (rows, L, fout)."""
    adapters: dict[int, tuple[torch.Tensor, torch.Tensor, float] | None] = {
        s: (torch.randn(r, fin, generator=gen), torch.randn(fout, r, generator=gen), 0.5 + s)
        for s, r in [(0, 2), (1, 3), (2, 1)]}
    adapters[3] = None
    return adapters, torch.randn(rows, L, fin, generator=gen), torch.randn(rows, L, fout, generator=gen)


def embedding_rows_ref(
    y: torch.Tensor,
    ids: torch.Tensor,
    adapters: Mapping[int, tuple[torch.Tensor, torch.Tensor, float] | None],
    assignments: Sequence[int | Sequence[tuple[int, float]]],
) -> torch.Tensor:
    """Return a new y: y_out[b] = y[b] + sum over row b's (slot, weight) of w * lora_embedding(ids[b], A, B, scale).

    ids: (B, L), y: (B, L, dim); adapters[slot] = (A (r, vocab), B (dim, r), scale) or None (no embedding LoRA).
    """
    out = y.clone()
    for b, a in enumerate(assignments):
        for slot, w in ([] if a == -1 else [(a, 1.0)]) if isinstance(a, int) else list(a):
            if adapters[slot] is not None:
                out[b] = out[b] + w * lora_embedding(ids[b], *adapters[slot])
    return out
