"""Merging a LoRA layer's adapters into its base weight: explicit and reversible (never a side effect of eval()).

`LayerMerge` is the part of LoraLayer (lora_layer.py) that merges: W <- W + w * delta(name) with the bit-exact
restore of functional.exact_merge / exact_restore, DoRA's row scale, and a LoRA-B bias merged into the base bias.
It works on the layer's state (`r`, `scaling`, `merged`, `residual`, `base_layer`) and hooks (`delta`,
`adapter_params`, `is_dora`, `lora_b_bias`, `_out_rows` / `_from_out_rows`); each merge leaves a MergeRecord
in `merged`, enough for `unmerge` to undo it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import functional as LF
from .errors import MergeStateError, NonFiniteError, UnsupportedFeatureError


@dataclass
class MergeRecord:
    """What `merge` did to a layer, enough for `unmerge` to undo it.

    weight: the factor the delta was merged with.  restore_error: max |W - unmerge(merge(W))| that a plain
    unmerge leaves (computed at merge time with the same arithmetic).  residual: kept when an exact restore was
    requested, else None: (flat indices, original values) of the elements a plain unmerge would get wrong.
    versions: the in-place version counters of the adapter's tensors, so a changed adapter cannot be unmerged.
    dora_scale: for a DoRA adapter, the g (out,) the merge scaled the rows by (computed from the unmerged base,
    so unmerge can invert it); None for plain LoRA.
    """

    weight: float
    restore_error: float
    residual: Optional[LF.Residual]
    versions: tuple[int, ...]
    dora_scale: Optional[torch.Tensor] = None
    bias_before: Optional[torch.Tensor] = None  # lora_bias: the base bias before scale * b was added to it


class LayerMerge:
    """merge / unmerge of a LoraLayer and the base-weight hooks they use (a layer type overrides the hooks)."""

    def delta(self, name: str) -> torch.Tensor:
        """scale * B @ A in the layout of the base weight (fp32 or wider)."""
        raise NotImplementedError

    def get_base_weight(self) -> torch.Tensor:
        """The base weight that merges write into (float layers: the weight tensor itself)."""
        return self.base_layer.weight.data

    def set_base_weight(self, weight: torch.Tensor) -> None:
        self.base_layer.weight.data.copy_(weight)

    def unmerged_base_weight(self) -> torch.Tensor:
        """The base weight without the merged adapters, and with what a residual init subtracted added back (up to
        rounding): the weight itself when neither applies."""
        w = self.get_base_weight()
        for name, rec in self.merged.items():
            if rec.dora_scale is not None:  # the only merged adapter on this layer (merge refuses others)
                w = self._merge_maps(name, rec.weight, w, w.dtype, rec.dora_scale)[1](w)
                break
            w = w - rec.weight * self.delta(name).to(w.dtype)
        for name, (a0, b0) in self.residual.items():  # the base holds W_res = W - scale * B0 @ A0
            d0 = LF.delta_weight(a0, b0, self.scaling[name])  # (out, in)
            w = w + self._from_out_rows(d0, w.shape).to(w.dtype)
        return w

    def _merge_maps(self, name: str, weight: float, w: torch.Tensor, compute: torch.dtype,
                    g: Optional[torch.Tensor] = None) -> tuple[Callable, Callable, Optional[torch.Tensor]]:
        """(W -> merged W, merged W -> W, g) in `compute`, W in the base's storage layout. Plain LoRA adds /
        subtracts weight * delta; DoRA (weight 1) gives g * (W + delta) row-wise and back, with g = m / ||W +
        delta||_row computed from `w` (the unmerged base) unless given."""
        d = weight * self.delta(name).to(compute)
        if not self.is_dora(name):
            return (lambda t: t + d), (lambda t: t - d), None
        rows, back = self._out_rows, (lambda t: self._from_out_rows(t, w.shape))
        if g is None:
            a, b, m = self.adapter_params(name)
            g = LF.dora_scale(m.to(compute), rows(w.to(compute)), a.to(compute), b.to(compute), self.scaling[name])
        d_rows = rows(d)
        return (lambda t: back(LF.dora_merged_weight(rows(t), d_rows, g)),
                lambda t: back(LF.dora_unmerged_weight(rows(t), d_rows, g)), g)

    def _out_rows(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor in the base weight's storage layout as (out, in * prod(k)) rows (DoRA's norm runs per row)."""
        return t

    def _from_out_rows(self, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Inverse of `_out_rows` for a weight of storage shape `shape`."""
        return t

    @torch.no_grad()
    def merge(self, name: str, weight: float = 1.0, *, safe: bool = True, exact: bool = False) -> MergeRecord:
        """W <- W + weight * delta(name). `safe` refuses a result with NaN/Inf (nothing is written);
        `exact` keeps the tiny residual that makes `unmerge` restore W bit for bit."""
        if name not in self.r:
            raise MergeStateError(f"no adapter {name!r} on this layer; have {self.adapter_names}")
        if name in self.merged:
            raise MergeStateError(f"adapter {name!r} is already merged")
        self.check_merge(name, weight)
        w = self.get_base_weight()
        compute = torch.promote_types(w.dtype, torch.float32)
        forward, back, g = self._merge_maps(name, weight, w, compute)
        merged, restored, kept = LF.exact_merge(w, forward, back)
        if safe and not torch.isfinite(merged).all():
            raise NonFiniteError(f"merging adapter {name!r} would write NaN/Inf into the base weight; nothing changed")
        diff = w.to(compute) - restored.to(compute)
        err = float(diff.abs().max()) if diff.numel() else 0.0
        residual = kept if exact and err > 0 else None
        self.set_base_weight(merged)
        bias_before = self._merge_lora_bias(name, weight)
        record = MergeRecord(weight=weight, restore_error=err, residual=residual, versions=self._versions(name),
                             dora_scale=g, bias_before=bias_before)
        self.merged[name] = record
        return record

    def check_merge(self, name: str, weight: float) -> None:
        """Raise what `merge(name, weight)` would refuse for DoRA, changing nothing: DoRA rescales whole rows of
        W, so it merges only at weight 1 into a layer holding no other merge, and nothing merges on top of it
        (the row scale g is defined from the bare base weight)."""
        if self.lora_b_bias(name) is not None and getattr(self.base_layer, "bias", None) is None:
            raise UnsupportedFeatureError(f"adapter {name!r} has a LoRA-B bias (lora_bias) but this "
                                          f"{type(self.base_layer).__name__} has no bias to merge it into (as in "
                                          "PEFT); keep it on the fly")
        if self.is_dora(name) and weight != 1.0:
            raise UnsupportedFeatureError(f"DoRA adapter {name!r} merges only with weight 1.0, got {weight}: a "
                                          "scaled DoRA update is not defined (merge it at weight 1)")
        if self.is_dora(name) and self.merged:
            raise MergeStateError(f"cannot merge DoRA adapter {name!r}: {list(self.merged)} already merged into this "
                                  "layer, and DoRA's row scale is defined from the bare base; unmerge them first")
        dora = [n for n, rec in self.merged.items() if rec.dora_scale is not None]
        if dora:
            raise MergeStateError(f"cannot merge {name!r}: DoRA adapter {dora[0]!r} is merged into this layer and "
                                  "rescaled its rows; unmerge it first")

    @torch.no_grad()
    def unmerge(self, name: str) -> MergeRecord:
        """Undo `merge(name)`: W <- W - weight * delta(name) (+ residual if the merge kept one)."""
        record = self.merged.get(name)
        if record is None:
            raise MergeStateError(f"adapter {name!r} is not merged; merged: {list(self.merged)}")
        if record.versions != self._versions(name):
            raise MergeStateError(f"adapter {name!r} changed since it was merged; unmerge would not restore the base")
        w = self.get_base_weight()
        compute = torch.promote_types(w.dtype, torch.float32)
        back = self._merge_maps(name, record.weight, w, compute, record.dora_scale)[1]
        self.set_base_weight(LF.exact_restore(w, back, record.residual))
        biased = [n for n, rec in self.merged.items() if rec.bias_before is not None]  # in merge order
        del self.merged[name]
        if record.bias_before is not None:  # the first LoRA-B bias merge holds the bare base bias, bit for bit
            bias = self.base_layer.bias.data
            if len(biased) == 1:
                bias.copy_(record.bias_before)
            else:
                bias.sub_((record.weight * self.scaling[name] * self.lora_b_bias(name).detach()).to(bias.dtype))
                if biased[0] == name:  # hand the bare base bias on to the next one
                    self.merged[biased[1]].bias_before = record.bias_before
        return record

    def _merge_lora_bias(self, name: str, weight: float) -> Optional[torch.Tensor]:
        """Add weight * scale * b (lora_bias) to the base bias; returns the bias before, or None (no LoRA-B bias)."""
        b = self.lora_b_bias(name)
        if b is None:
            return None
        bias = self.base_layer.bias.data
        before = bias.clone()
        bias.add_((weight * self.scaling[name] * b.detach()).to(bias.dtype))
        return before

    def _versions(self, name: str) -> tuple[int, ...]:
        return tuple(t._version for t in self.adapter_params(name))
