"""Forward plans of a LoRA layer: which path its forward runs, chosen when the layer's state changes.

A LoraLayer (lora_layer.py) keeps one plan and its forward is `plan(layer, x, *args, **kwargs)`. Every public
state change (active adapters and weights, merge/unmerge, add/remove adapter, disabling, per-row routing,
`LoraLinear.fused`) marks the plan stale, and the next forward chooses a new one (`LoraLayer.choose_plan`),
so a choice that raises (a DoRA adapter in a mix) raises at that forward, as before plans:

    BasePlan    y = base(x)                        disabled, nothing active, or every active adapter merged
    RoutedPlan  y[b] = base(x)[b] + lora_{names[idx[b]]}(x[b])      per-row routing (inject.route_rows)
    SumPlan     y = base(x) + sum_(name, w) w * lora_name(dropout(x))    the active, unmerged adapters
    FusedPlan   SumPlan's y for one plain adapter as ONE autograd node (LF.linear_with_lora; LoraLinear)

Plans hold names and weights only, never the layer or its tensors (looked up per call: `.to()`, FSDP and
load_state_dict(assign=True) replace those), so a deep copy or a replica of a layer shares them safely.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal, Optional

import torch
import torch.nn as nn

from . import functional as LF

if TYPE_CHECKING:
    from .layers import LoraLinear
    from .lora_layer import LoraLayer

# How one active adapter adds its output: "dora" rescales the whole output (alone, weight 1); "lora" adds
# w * lora(x) cast to the output's dtype; "addmm" adds it with one addmm (LF.lora_linear_add) when the output is
# in the adapter's dtype (LoraLinear, no LoRA-B bias), else as "lora".
AddPath = Literal["dora", "lora", "addmm"]


@dataclass(frozen=True)
class BasePlan:
    """y = base(x): the adapters are disabled, none is active, or every active one is merged."""

    def __call__(self, layer: LoraLayer, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return layer.base_layer(x, *args, **kwargs)


@dataclass(frozen=True)
class RoutedPlan:
    """y[b] = base(x)[b] + lora_{names[idx[b]]}(x[b]) per `layer.row_routing` (LoraLayer._routed)."""

    def __call__(self, layer: LoraLayer, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return layer._routed(x, layer.base_layer(x, *args, **kwargs))


@dataclass(frozen=True)
class SumPlan:
    """y = base(x) + sum over `adapters` (the active, unmerged ones, in order) of w * scale * B(A(dropout(x))),
    each added by its AddPath; a DoRA adapter (then the only one, weight 1) rescales the output instead."""

    adapters: tuple[tuple[str, float, AddPath], ...]  # (name, mixing weight, how it adds)

    def __call__(self, layer: LoraLayer, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = layer.base_layer(x, *args, **kwargs)
        for name, weight, path in self.adapters:
            if path == "dora":
                result = layer._add_dora(name, x, result)
            else:
                add = layer._addmm_lora if path == "addmm" else layer._add_lora
                result = add(name, layer.lora_dropout[name](x), result, weight)
        return result


@dataclass(frozen=True)
class FusedPlan:
    """One active, unmerged plain adapter (no DoRA, no LoRA-B bias) over a plain nn.Linear / Conv1D base:
    y = x @ W.T + bias + w * scale * (x @ A.T) @ B.T as ONE autograd node (LF.linear_with_lora), which equals
    `fallback` (the SumPlan of the same state) up to float rounding.

    The facts checked per call are those nobody tells the layer about: the input (its dtype against the
    adapter's, extra arguments, autocast, which would cast the node's GEMMs one by one), the base weight's
    dtype, its requires_grad (training code freezes and unfreezes parameters directly; the node treats W as a
    constant), hooks registered on the base (the node would skip them) and live dropout (nn.Module.train()
    recursion and replacing `lora_dropout[name]` reach the dropout module, not the layer). Any of them -> fallback.
    """

    name: str
    weight: float
    fallback: SumPlan

    def __call__(self, layer: LoraLinear, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base, a = layer.base_layer, layer.lora_A[self.name].weight
        w, bias, drop = base.weight, base.bias, layer.lora_dropout[self.name]
        if (args or kwargs or x.dtype != a.dtype or w.dtype != a.dtype or torch.is_autocast_enabled(x.device.type)
                or w.requires_grad or (bias is not None and bias.requires_grad)
                or base._forward_hooks or base._forward_pre_hooks
                or (drop.training and not isinstance(drop, nn.Identity))):
            return self.fallback(layer, x, *args, **kwargs)
        scale = self.weight * layer.scaling[self.name]
        return LF.linear_with_lora(x, LF.out_in(w, layer.layout), bias, a, layer.lora_B[self.name].weight, scale)


Plan = BasePlan | RoutedPlan | SumPlan | FusedPlan


class PlanInput:
    """A layer attribute the plan depends on (`active`, `disabled`, `row_routing`, `fused`): assigning it stores
    `convert(value)` and marks the layer's plan stale (`layer._stale()`)."""

    def __init__(self, convert: Callable[[Any], Any] = lambda value: value) -> None:
        self.convert = convert

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = "_" + name

    def __get__(self, layer: Any, owner: Optional[type] = None) -> Any:
        return self if layer is None else layer.__dict__[self.slot]

    def __set__(self, layer: Any, value: Any) -> None:
        layer.__dict__[self.slot] = self.convert(value)
        layer._stale()


class WatchedDict(dict):
    """A dict that calls `on_change()` after every change. A layer keeps its merge records in one, so a merge
    or unmerge marks its plan stale whoever writes the records (LoraQuantLinear writes them itself)."""

    def __init__(self, on_change: Callable[[], None]) -> None:
        super().__init__()
        self.on_change = on_change


def _notifying(method: Callable[..., Any]) -> Callable[..., Any]:
    def changed(self: WatchedDict, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        finally:
            on_change = self.__dict__.get("on_change")  # unpickling fills the items before the attributes
            if on_change is not None:
                on_change()

    changed.__name__ = method.__name__
    return changed


for _method in ("__setitem__", "__delitem__", "__ior__", "pop", "popitem", "clear", "update", "setdefault"):
    setattr(WatchedDict, _method, _notifying(getattr(dict, _method)))
del _method
