"""RuntimeLinear: the wrapper the multi-adapter runtime puts in place of each target linear layer.

It holds no adapter tensors: y = base_layer(x), then y[b] += row b's LoRA from the plan the engine set for the
forward in progress (`CurrentPlan`, shared by every wrapper of one engine; see model.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from ..errors import UnsupportedModuleError
from ..functional import linear_features
from .ops import BatchPlan


@dataclass
class CurrentPlan:
    """The plan the wrappers apply during the forward in progress (None = every row base only)."""

    plan: Optional[BatchPlan] = None


class RuntimeLinear(nn.Module):
    """y = base_layer(x), then y[b] += each row's LoRA for layer `key` from the engine's current plan.

    Holds no adapter tensors. The base layer is any module mapping (..., in) -> (..., out): nn.Linear,
    transformers Conv1D or loraplex QuantLinear (the choice was made when the engine wrapped it).
    """

    def __init__(self, base_layer: nn.Module, key: str, in_features: int, out_features: int,
                 current: CurrentPlan) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.key = key
        self.in_features, self.out_features = in_features, out_features
        self._current = current  # shared with the engine; a plain attribute, not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)  # (..., out)
        plan = self._current.plan
        if plan is not None and self.key in plan.layers:
            plan.apply_(self.key, x, y)
        return y

    def extra_repr(self) -> str:
        return f"key={self.key!r}, in={self.in_features}, out={self.out_features}"


def wrappable_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a module the runtime can wrap; UnsupportedModuleError otherwise."""
    try:
        return linear_features(module)
    except UnsupportedModuleError:
        raise UnsupportedModuleError(f"the multi-adapter runtime wraps nn.Linear, transformers Conv1D and "
                                     f"QuantLinear, got {type(module).__name__}") from None
