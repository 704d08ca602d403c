"""The engine's merged mode (`MultiLoraModel.merge` / `unmerge`): one adapter added into the base layers, exactly.

    merge:   W' = W + scale * B @ A        (bias' = bias + scale * b for a lora_bias adapter)
    unmerge: W  = W' - scale * B @ A, plus the few elements rounding would lose, restored bit for bit

The product is formed in float32 or wider and kept in the layer's weight layout (Conv1D stores (in, out)); the
elements that W' - dW would not give back are kept at merge (functional.exact_merge). While an adapter is
merged, `Merged.weight` / `Merged.bias` give the base without it, bit for bit (DoRA's norms read the bare base).
Float Linear / Conv1D layers only: embedding and quantized layers are refused, and so is a LoRA-B bias on a layer
without a bias.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..errors import UnsupportedFeatureError
from ..functional import Residual, delta_weight, exact_merge, exact_restore, out_in, weight_layout
from .pooltypes import Lease


@dataclass
class Merged:
    """An adapter merged into base layers: what `restore` needs to put them back bit for bit."""

    lease: Lease  # pins the merged version (its tensors are read again to restore)
    layers: dict[str, nn.Module]  # key -> the base layer the adapter is merged into
    residuals: dict[str, Residual]  # key -> (flat indices, original values) of the weight
    bias_residuals: dict[str, Residual] = field(default_factory=dict)  # lora_bias: key -> the same, of the bias

    def weight(self, key: str) -> torch.Tensor:
        """The weight of merged layer `key` (storage layout) without the adapter: W' - dW + residual."""
        A, B, scale = self.lease.pool.tensors(self.lease.slot, key)
        w = self.layers[key].weight.data
        d = _delta(self.layers[key], A, B, scale, w)
        return exact_restore(w, lambda t: t - d, self.residuals[key])

    def bias(self, key: str) -> torch.Tensor:
        """The bias of layer `key` (one in `bias_residuals`) without the adapter's LoRA-B bias, bit for bit."""
        bias = self.layers[key].bias
        b = self.lease.pool.lora_bias(self.lease.slot, key)
        d = self.lease.pool.tensors(self.lease.slot, key)[2] * b.to(torch.promote_types(bias.dtype, torch.float32))
        return exact_restore(bias.data, lambda t: t - d, self.bias_residuals[key])

    def restore(self) -> None:
        """Take the adapter out of every layer again (the lease stays held: the caller releases it)."""
        for k in self.residuals:
            self.layers[k].weight.data.copy_(self.weight(k))
        for k in self.bias_residuals:
            self.layers[k].bias.data.copy_(self.bias(k))


def merge_into(base_layers: Mapping[str, nn.Module], lease: Lease) -> Merged:
    """Add the leased adapter into those of `base_layers` ({key: base layer}) it targets; every layer is checked
    before any is changed (UnsupportedFeatureError names the first one that cannot take it)."""
    pool, slot = lease.pool, lease.slot
    layers = [(k, t) for k in base_layers if (t := pool.tensors(slot, k)) is not None]
    for k, _ in layers:
        base = base_layers[k]
        if not (isinstance(base, nn.Linear)
                or (not isinstance(base, nn.Embedding) and weight_layout(base) == "in_out")):
            raise UnsupportedFeatureError(
                f"cannot merge into {k!r} ({type(base).__name__}); the runtime "
                "merges into float Linear/Conv1D weights only (serve a quantized base unmerged)"
            )
    biased = [(k, b, t[2]) for k, t in layers if (b := pool.lora_bias(slot, k)) is not None]
    bare = [k for k, _, _ in biased if getattr(base_layers[k], "bias", None) is None]
    if bare:
        raise UnsupportedFeatureError(
            f"adapter {lease.name!r} has a LoRA-B bias (lora_bias) at {bare[0]!r}, whose base layer has no bias "
            "to merge it into (PEFT cannot merge it either); serve it unmerged"
        )
    residuals = {k: _add_delta(base_layers[k], *t) for k, t in layers}
    bias_residuals = {k: _add_bias(base_layers[k], b, scale) for k, b, scale in biased}
    return Merged(lease, {k: base_layers[k] for k, _ in layers}, residuals, bias_residuals)


def _delta(layer: nn.Module, A: torch.Tensor, B: torch.Tensor, scale: float, w: torch.Tensor) -> torch.Tensor:
    """scale * B @ A in the layout of `layer`'s weight `w` (Conv1D stores (in, out)), in float32 or wider."""
    compute = torch.promote_types(w.dtype, torch.float32)
    d = delta_weight(A.to(compute), B.to(compute), scale)  # (out, in)
    return out_in(d, weight_layout(layer))


def _add_delta(layer: nn.Module, A: torch.Tensor, B: torch.Tensor, scale: float) -> Residual:
    """W <- W + dW; returns the (flat index, original value) pairs that W' - dW would not give back."""
    w = layer.weight.data
    d = _delta(layer, A, B, scale, w)
    merged, _, residual = exact_merge(w, lambda t: t + d, lambda t: t - d)
    w.copy_(merged)
    return residual


def _add_bias(layer: nn.Module, b: torch.Tensor, scale: float) -> Residual:
    """bias <- bias + scale * b (a lora_bias adapter's merge); returns what bias' - scale * b would not give back."""
    bias = layer.bias.data
    d = scale * b.to(torch.promote_types(bias.dtype, torch.float32))
    merged, _, residual = exact_merge(bias, lambda t: t + d, lambda t: t - d)
    bias.copy_(merged)
    return residual
