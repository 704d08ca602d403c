"""LoRA over a quantized base layer, and the three ways to merge an adapter into a quantized base.

On the fly (never merged), the adapter stays full precision (fp32) beside the packed base:
    y = qbase(x) + scale * (x @ A.T) @ B.T          qbase(x) = x @ deQ(W_q).T + b
    A: (r, in) fp32, B: (out, r) fp32; the packed W_q and its scales are buffers, so only A/B get gradients.

Merging into a quantized base cannot be exact: the merged weight must be quantized again. A strategy is
chosen explicitly, per model (`merge_quantized(model, name, strategy=...)`, or `set_merge_strategy` and then
the ordinary `loraplex.merge`):
    "requantize"     W_q' = Q(deQ(W_q) + w * delta)        what PEFT does. Each element moves only if the delta
                     crosses a rounding boundary of the grid it already sits on, so deltas smaller than half a
                     quantization step mostly vanish and the base's first rounding error is kept: warns.
    "from_original"  W_q' = Q(W_fp + sum of merged w_i * delta_i)   from the float weights kept at quantize
                     time (quantize_model(..., keep_original=True)); one rounding of the exact merged weight.
    "separate"       no merge: the adapter stays on the fly (the formula above). Layer merge() refuses it, so
                     merge_and_unload can never drop an adapter that was meant to stay.
Unmerge restores the packed tensors saved before the merge, bit for bit (no arithmetic is undone). Merges
into one layer form a stack; unmerging one that is not on top restores its snapshot and merges the later ones
again with their own strategy and weight (so any unmerge order ends at the original packed tensors).

Example (the adapter is full precision throughout; only the deployment artefact is re-quantized):
    quantize_model(model, "nf4", keep_original=True)
    inject(model, LoraConfig(r=16, target_modules="all-linear"), "tone")     # LoraQuantLinear wrappers
    ... train or load_adapter(model, "tone_dir", "tone") ...
    merge_quantized(model, "tone", strategy="from_original")                 # W_q' = Q(W_fp + delta)
    unmerge(model, "tone")                                                   # packed tensors restored exactly
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from ..errors import ConfigError, MergeStateError, NonFiniteError, QuantConfigError, UnsupportedFeatureError
from ..inject import lora_layers, require_adapter
from ..layers import LoraLinear
from ..lora_layer import MergeRecord
from ..merge import merge, merged_adapters
from .linear import QuantLinear

STRATEGIES = ("requantize", "from_original", "separate")
REQUANTIZE_WARNING = (
    "merging into a quantized base with strategy 'requantize' re-rounds deQ(W_q) + delta onto the quantization "
    "grid: delta components smaller than half a quantization step are lost and the base's rounding error is "
    "kept, so the merged model drifts from the full-precision merge. Prefer strategy='from_original' "
    "(quantize with keep_original=True) or strategy='separate' (keep the adapter on the fly)."
)


class QuantizedMergeWarning(UserWarning):
    """Merging into a quantized base with strategy 'requantize' loses adapter quality."""


@dataclass
class QuantMergeRecord(MergeRecord):
    """A MergeRecord of a quantized layer. restore_error is always 0 and residual None: unmerge copies back
    `previous`, the packed tensors from before this merge.

    strategy: "requantize" | "from_original".  previous: {buffer name: tensor} snapshot (int8: qweight, scale;
    nf4: packed + absmax or the double-quant tensors).  applied_error / delta_norm: Frobenius norms of
    (deQ(W_q') - deQ(W_q) - w*delta) and of w*delta, i.e. how much of the delta the quantized merge missed.
    """

    strategy: str = "requantize"
    previous: dict[str, torch.Tensor] = field(default_factory=dict)
    applied_error: float = 0.0
    delta_norm: float = 0.0


class LoraQuantLinear(LoraLinear):
    """LoRA over a `QuantLinear` base: y = qbase(x) + sum_active w * scale * B(A(dropout(x))), A/B in fp32.

    in/out features come from the QuantLinear; A is (r, in), B is (out, r) as for nn.Linear, so adapter files
    are the same as over the float base. `merge_strategy` (None until chosen) decides how merge() writes
    into the packed weight; see the module docstring.
    """

    def __init__(self, base_layer: QuantLinear) -> None:
        if not isinstance(base_layer, QuantLinear):
            raise ConfigError(f"LoraQuantLinear wraps a QuantLinear, got {type(base_layer).__name__}")
        super().__init__(base_layer)
        self.merge_strategy: Optional[str] = None

    # -- adapters are fp32 whatever the base computes in -------------------------------------------------
    def _lora_dtype(self) -> torch.dtype:
        return torch.float32

    def _device(self) -> torch.device:
        return next(iter(self.base_layer.quantized_weight().tensors().values())).device

    def _create(self, name: str, r: int) -> None:
        kw = dict(bias=False, device=self._device(), dtype=torch.float32)  # no dequantize just for a device
        self.lora_A[name] = nn.Linear(self.in_features, r, **kw)
        self.lora_B[name] = nn.Linear(r, self.out_features, **kw)

    # -- the hooks of LoraLayer: the float view of the packed weight ------------------------------------
    def get_base_weight(self) -> torch.Tensor:
        """deQ(W_q) as an fp32 (out, in) tensor (a new tensor: writing to it changes nothing)."""
        return self.base_layer.quantized_weight().dequantize(torch.float32)

    def set_base_weight(self, weight: torch.Tensor) -> None:
        """W_q <- Q(weight); weight is float (out, in)."""
        self.base_layer.requantize(weight)

    def unmerged_base_weight(self) -> torch.Tensor:
        """deQ of the packed tensors from before the first merge (exact, no delta is subtracted)."""
        if not self.merged:
            return self.get_base_weight()
        first = next(iter(self.merged.values()))
        spec, shape = self.base_layer.spec, (self.out_features, self.in_features)
        return spec.from_tensors(first.previous, shape).dequantize(torch.float32)

    # -- merge ------------------------------------------------------------------------------------------
    def set_merge_strategy(self, strategy: Optional[str]) -> None:
        if strategy is not None and strategy not in STRATEGIES:
            raise ConfigError(f"merge strategy must be one of {STRATEGIES}, got {strategy!r}")
        if strategy == "from_original" and self.base_layer.original_weight is None:
            raise QuantConfigError(_NO_ORIGINAL)
        self.merge_strategy = strategy

    def merge(self, name: str, weight: float = 1.0, *, safe: bool = True, exact: bool = False) -> QuantMergeRecord:
        """Quantize the merged weight per `merge_strategy` (module docstring). Unmerge is always bit-exact,
        so `exact` changes nothing; `safe` refuses a NaN/Inf merged weight (nothing is written)."""
        if name not in self.r:
            raise MergeStateError(f"no adapter {name!r} on this layer; have {self.adapter_names}")
        if name in self.merged:
            raise MergeStateError(f"adapter {name!r} is already merged")
        self.check_merge(name, weight)
        if self.merge_strategy is None:
            raise ConfigError(
                f"merging adapter {name!r} into a quantized base needs an explicit strategy: "
                f"merge_quantized(model, {name!r}, strategy=...) or set_merge_strategy(model, ...) with one of "
                f"{STRATEGIES}"
            )
        if self.merge_strategy == "separate":
            raise MergeStateError(
                f"merge strategy 'separate' keeps adapter {name!r} on the fly, so there is nothing to merge; "
                "leave it active (merge_quantized(..., strategy='separate') does exactly that)"
            )
        if self.merge_strategy == "requantize":
            warnings.warn(REQUANTIZE_WARNING, QuantizedMergeWarning, stacklevel=3)  # the caller of loraplex.merge
        return self._merge(name, weight, self.merge_strategy, safe)

    def check_merge(self, name: str, weight: float) -> None:
        if self.is_dora(name):
            raise UnsupportedFeatureError(
                f"merging DoRA adapter {name!r} into a quantized base is not implemented (its row scale would be "
                "re-rounded); keep it on the fly, or merge it into the float base"
            )
        super().check_merge(name, weight)

    @torch.no_grad()
    def _merge(self, name: str, weight: float, strategy: str, safe: bool) -> QuantMergeRecord:
        before = self.get_base_weight()  # (out, in) fp32
        d = weight * self.delta(name).to(device=before.device, dtype=torch.float32)  # (out, in)
        if strategy == "requantize":
            target = before + d
        else:
            original = self.base_layer.original_weight
            if original is None:
                raise QuantConfigError(_NO_ORIGINAL)
            target = original.to(device=before.device, dtype=torch.float32)
            for other, rec in self.merged.items():  # the merged weight holds every merged adapter, in merge order
                target = target + rec.weight * self.delta(other).to(device=before.device, dtype=torch.float32)
            target = target + d
        if safe and not torch.isfinite(target).all():
            raise NonFiniteError(f"merging adapter {name!r} would write NaN/Inf into the base weight; nothing changed")
        previous = {k: t.clone() for k, t in self.base_layer.quantized_weight().tensors().items()}
        self.set_base_weight(target)
        applied = self.get_base_weight() - before  # what the quantized merge really added
        record = QuantMergeRecord(
            weight=weight, restore_error=0.0, residual=None, versions=self._versions(name), strategy=strategy,
            previous=previous, applied_error=float(torch.linalg.norm(applied - d)),
            delta_norm=float(torch.linalg.norm(d)),
        )
        self.merged[name] = record
        return record

    @torch.no_grad()
    def unmerge(self, name: str) -> QuantMergeRecord:
        """Copy back the packed tensors saved by merge(name); adapters merged after it are merged again."""
        record = self.merged.get(name)
        if record is None:
            raise MergeStateError(f"adapter {name!r} is not merged; merged: {list(self.merged)}")
        order = list(self.merged)
        later = [(n, self.merged[n]) for n in order[order.index(name) + 1:]]
        weights = self.base_layer.quantized_weight().tensors()
        for key, saved in record.previous.items():
            weights[key].copy_(saved)
        for n in [name] + [n for n, _ in later]:
            del self.merged[n]
        for n, rec in later:  # replay with the strategy and weight each was merged with
            self._merge(n, rec.weight, rec.strategy, safe=False)
        return record

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, merge_strategy={self.merge_strategy!r}"


_NO_ORIGINAL = (
    "merge strategy 'from_original' needs the float weights kept at quantize time, but this QuantLinear has "
    "none; quantize with quantize_model(model, scheme, keep_original=True) (or QuantLinear.from_linear(..., "
    "keep_original=True)), or choose strategy 'requantize' or 'separate'"
)


# -- whole models ---------------------------------------------------------------------------------------------
def quant_lora_layers(model: nn.Module) -> list[tuple[str, LoraQuantLinear]]:
    """(module name, wrapper) for every LoRA wrapper over a quantized layer."""
    return [(k, m) for k, m in lora_layers(model) if isinstance(m, LoraQuantLinear)]


def set_merge_strategy(model: nn.Module, strategy: Optional[str]) -> int:
    """Choose how the ordinary `merge(model, ...)` writes into every quantized layer (None: refuse to merge).
    Checked on every layer before any changes (e.g. 'from_original' needs keep_original). Returns the count."""
    layers = quant_lora_layers(model)
    if strategy is not None and strategy not in STRATEGIES:
        raise ConfigError(f"merge strategy must be one of {STRATEGIES}, got {strategy!r}")
    missing = [k for k, m in layers if strategy == "from_original" and m.base_layer.original_weight is None]
    if missing:
        raise QuantConfigError(f"{_NO_ORIGINAL} (layers without it: {missing[:3]}{' ...' * (len(missing) > 3)})")
    for _, layer in layers:
        layer.set_merge_strategy(strategy)
    return len(layers)


@dataclass(frozen=True)
class QuantMergeReport:
    """Outcome of merge_quantized. quantized_layers / float_layers: layers the adapter was merged into
    (0 and 0 for 'separate'). delta_error: ||applied delta - w * delta||_F / ||w * delta||_F over all quantized
    layers (0: the quantized merge kept the delta exactly; 1: it kept nothing, or added as much noise)."""

    adapter: str
    strategy: str
    weight: float
    quantized_layers: int
    float_layers: int
    delta_error: float


def merge_quantized(
    model: nn.Module, name: str, weight: float = 1.0, *, strategy: str, safe: bool = True
) -> QuantMergeReport:
    """Merge adapter `name` (times `weight`) into a model whose base is (partly) quantized.

    Quantized layers merge with `strategy` (see the module docstring), float layers as in `loraplex.merge`;
    all or nothing (on failure every layer is restored). The strategy stays set on the layers, so `unmerge`
    and later merges follow it. 'separate' checks the adapter and returns without changing any weight.
    """
    require_adapter(model, name)
    if name in merged_adapters(model):
        raise MergeStateError(f"adapter {name!r} is already merged; unmerge it first")
    set_merge_strategy(model, strategy)
    layers = [m for _, m in quant_lora_layers(model) if name in m.r]
    if strategy == "separate":
        return QuantMergeReport(name, strategy, weight, 0, 0, 0.0)
    rep = merge(model, name, weight, safe=safe)
    records = [m.merged[name] for m in layers]
    num = sum(r.applied_error**2 for r in records) ** 0.5
    den = sum(r.delta_norm**2 for r in records) ** 0.5
    return QuantMergeReport(name, strategy, weight, len(layers), rep.layers - len(layers), num / den if den else 0.0)


__all__ = [
    "STRATEGIES", "LoraQuantLinear", "QuantMergeRecord", "QuantMergeReport", "QuantizedMergeWarning",
    "merge_quantized", "quant_lora_layers", "set_merge_strategy",
]
