"""How a batch plan computes one layer: the "gather" and "segment" strategies (loraplex.runtime.ops).

Each distinct assignment of a batch is one `Virtual` adapter per layer (its slots' A's concatenated along r,
their B's scaled and concatenated the same way; see `layer_views`). A plan then stores, per layer:
  - `GatherLayer`: per active row, its virtual adapter zero-padded to the batch's largest rank (two bmm's);
  - `SegmentLayer`: one `Segment` per distinct virtual adapter over its rows (two matmuls each).
Both add into the base layer's output y in place; `BatchPlan.apply_` checks shapes and dtypes before.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Union

import torch

from ..errors import ShapeMismatchError
from .rows import RowIndex

# One row's adapters: ((slot, weight), ...); () = base only.
Assignment = tuple[tuple[int, float], ...]
# Where a plan reads adapter tensors: (slot, layer_key) -> (A (r, in), B (out, r), scale), or None when
# that slot has no LoRA on that layer.
AdapterSource = Callable[[int, str], Union[tuple[torch.Tensor, torch.Tensor, float], None]]


@dataclass(slots=True)
class GatherLayer:
    """One layer of a gather plan: per active row, its virtual adapter padded to rank R."""

    rows: torch.Tensor | None  # (n,) int64 active rows of the batch; None = every row is active
    A: torch.Tensor  # (n, R, in)   each row's virtual A, zero rows past its rank (lora_compute_dtype)
    Bt: torch.Tensor  # (n, R, out)  each row's (w * scale * B).T, zero rows past its rank
    # (A used through a transposed view and Bt stored transposed: the fastest bmm layouts measured on CPU)

    def apply_(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x = x.to(self.A.dtype)  # no-op unless the plan computes in float32 for a bf16/fp16 batch
        if self.rows is None:
            h = torch.bmm(x, self.A.transpose(1, 2))  # (B, L, R)
            if y.is_contiguous() and y.dtype == self.Bt.dtype:
                y.baddbmm_(h, self.Bt)  # (B, L, out)
            else:  # y in another dtype, or a view (a part of a fused GEMM's output: CPU baddbmm_ loops over rows)
                y.add_(torch.bmm(h, self.Bt))
        else:
            h = torch.bmm(x.index_select(0, self.rows), self.A.transpose(1, 2))  # (n, L, R)
            y.index_add_(0, self.rows, torch.bmm(h, self.Bt).to(y.dtype))  # (n, L, out) into the active rows


@dataclass(slots=True)
class Segment:
    """One distinct virtual adapter over its rows: y[rows] += alpha * (x[rows] @ A.T) @ Bt."""

    rows: slice | torch.Tensor  # contiguous rows as a slice, else an (n_u,) int64 index
    A: torch.Tensor  # (r_u, in)  the virtual adapter's A, at its own rank
    Bt: torch.Tensor  # (r_u, out) its B.T (for a mix: cat_k(c_k B_k).T)
    alpha: float  # w * scale for a single slot (its tensors are then the pool's own, not copied); 1.0 for a mix
    owned: bool  # A / Bt are copies made for this plan (counted in BatchPlan.nbytes)


@dataclass(slots=True)
class SegmentLayer:
    """One layer of a segment plan: one pair of matmuls per distinct virtual adapter."""

    segments: tuple[Segment, ...]
    compute: torch.dtype  # lora_compute_dtype of the plan: A, Bt and x are cast to it at each call (no-op if equal)

    def apply_(self, x: torch.Tensor, y: torch.Tensor) -> None:
        L = x.shape[1]
        for seg in self.segments:
            A, Bt = seg.A.to(self.compute), seg.Bt.to(self.compute)  # (r_u, in), (r_u, out)
            if isinstance(seg.rows, slice):
                xs, ys = x[seg.rows], y[seg.rows]  # views: (n_u, L, in), (n_u, L, out)
                h = xs.reshape(-1, xs.shape[-1]).to(self.compute) @ A.T  # (n_u * L, r_u)
                if ys.is_contiguous() and ys.dtype == self.compute:
                    ys.view(-1, ys.shape[-1]).addmm_(h, Bt, alpha=seg.alpha)
                else:
                    ys.add_((h @ Bt).view(ys.shape), alpha=seg.alpha)
            else:
                xs = x.index_select(0, seg.rows)  # (n_u, L, in)
                h = xs.view(-1, xs.shape[-1]).to(self.compute) @ A.T  # (n_u * L, r_u)
                y.index_add_(0, seg.rows, (h @ Bt).view(-1, L, Bt.shape[-1]).to(y.dtype), alpha=seg.alpha)


@dataclass(slots=True)
class Virtual:
    """One distinct assignment at one layer: y_rows += alpha * (x_rows @ A.T) @ Bt."""

    A: torch.Tensor  # (R, in)   cat_k A_k
    Bt: torch.Tensor  # (R, out)  cat_k (c_k B_k).T for a mix; B.T for a single slot
    alpha: float  # 1.0 for a mix (c_k = w_k * scale_k folded into Bt); w * scale for a single slot
    owned: bool  # A / Bt were copied for the plan (False: they are the source's own tensors)


def layer_views(
    get: AdapterSource,
    a: Assignment,
    layers: Mapping[str, tuple[int, int]],
    *,
    dtype: torch.dtype,
    device: torch.device,
    memo: MutableMapping[Assignment, dict[str, Virtual | None]] | None = None,
) -> dict[str, Virtual | None]:
    """What a plan reads for assignment `a` (normalized) at every layer: {key: view, or None where no slot of
    `a` has LoRA}. A single-slot result that copies nothing is stored in `memo` (see `build_plan`); calling
    this when an adapter arrives makes its first plan as cheap as the later ones."""
    if memo is not None and len(a) == 1:
        hit = memo.get(a)
        if hit is not None and hit.keys() == layers.keys():
            return hit
    out = {key: _virtual(get, a, key, fin, fout, dtype, device) for key, (fin, fout) in layers.items()}
    if memo is not None and len(a) == 1 and not any(v.owned for v in out.values() if v is not None):
        memo[a] = out
    return out


def _virtual(
    get: AdapterSource, a: Assignment, key: str, fin: int, fout: int, dtype: torch.dtype, device: torch.device
) -> Virtual | None:
    """One assignment's virtual adapter at layer `key`; None when none of its slots has LoRA there.

    A mix concatenates along r, exactly: sum_k c_k (x @ A_k.T) @ B_k.T == (x @ cat(A_k).T) @ cat(c_k B_k).T,
    with c_k = w_k * scale_k folded into B in float32 (at least), then cast to `dtype` once.
    """
    parts = []
    for slot, w in a:
        t = get(slot, key)
        if t is None:
            continue
        A, B, scale = t
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != fin or B.shape[0] != fout or A.shape[0] != B.shape[1]:
            raise ShapeMismatchError(
                f"slot {slot} at layer {key!r}: expected A (r, {fin}) and B ({fout}, r), "
                f"got A {tuple(A.shape)} and B {tuple(B.shape)}"
            )
        parts.append((A, B, w * scale))
    if not parts:
        return None
    if len(parts) == 1:  # no copy when the source already has the plan's dtype and device
        A, B, c = parts[0]
        A2, Bt2 = A.to(device=device, dtype=dtype), B.T.to(device=device, dtype=dtype)
        return Virtual(A2, Bt2, c, owned=A2 is not A or Bt2.data_ptr() != B.data_ptr())
    compute = torch.promote_types(dtype, torch.float32)
    A = torch.cat([A.to(device=device, dtype=dtype) for A, _, _ in parts], dim=0)  # (R, in)
    Bt = torch.cat([(B.T.to(device=device, dtype=compute) * c).to(dtype) for _, B, c in parts], dim=0)  # (R, out)
    return Virtual(A, Bt, 1.0, owned=True)


def gather_layer(
    virt: list[Virtual | None], rows: RowIndex, fin: int, fout: int, dtype: torch.dtype, device: torch.device
) -> GatherLayer | None:
    """One layer's GatherLayer from virt[u] (distinct assignment u's virtual adapter, or None where it has no LoRA
    here): per active row, its adapter padded to the largest rank, alpha folded into Bt; None when no row has
    LoRA here."""
    present = tuple(u for u, v in enumerate(virt) if v is not None)
    if not present:
        return None
    idx, sel = rows.active(present)  # active rows, and each one's distinct assignment
    R = max(virt[u].A.shape[0] for u in present)
    by_rank: dict[int, list[int]] = {}
    for u in present:
        by_rank.setdefault(virt[u].A.shape[0], []).append(u)
    alphas = [virt[u].alpha for u in range(len(virt)) if virt[u] is not None]
    if len(present) == len(virt) and len(by_rank) == 1:  # one rank, all present: no padding, no zero fill
        A_u = torch.stack([v.A for v in virt]).to(dtype)  # (U, R, in)
        Bt_u = torch.stack([v.Bt for v in virt]).to(dtype)  # (U, R, out)
        if any(a != 1.0 for a in alphas):
            Bt_u.mul_(torch.tensor(alphas, dtype=torch.float32, device=device).view(-1, 1, 1))  # fold alpha
    else:
        A_u = torch.zeros(len(virt), R, fin, dtype=dtype, device=device)  # (U, R, in)
        Bt_u = torch.zeros(len(virt), R, fout, dtype=dtype, device=device)  # (U, R, out)
        for u in present:
            v = virt[u]
            r = v.A.shape[0]
            A_u[u, :r] = v.A
            Bt_u[u, :r].copy_(v.Bt).mul_(v.alpha)  # fold alpha (in the stack's dtype): its rows all use alpha 1
    if sel == list(range(len(virt))):  # every row its own assignment, in order: the stacks are the rows
        return GatherLayer(idx, A_u, Bt_u)
    u_idx = torch.tensor(sel, dtype=torch.long, device=device)
    return GatherLayer(idx, A_u.index_select(0, u_idx), Bt_u.index_select(0, u_idx))  # (n, R, in), (n, R, out)


def segment_layer(virt: list[Virtual | None], rows: RowIndex, compute: torch.dtype) -> SegmentLayer | None:
    """One layer's SegmentLayer: a Segment per distinct assignment with LoRA here (None when there is none)."""
    sel = rows.sel
    segs = tuple([Segment(sel[u], v.A, v.Bt, v.alpha, v.owned) for u, v in enumerate(virt) if v is not None])
    return SegmentLayer(segs, compute) if segs else None
