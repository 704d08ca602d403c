"""Merge adapters into the base weights and take them out again, over a whole model.

merge:   W <- W + weight * scale * B @ A   for every layer of the adapter (all or nothing)
unmerge: W <- W - weight * scale * B @ A   (+ the stored residual when the merge was `exact`)
Both are explicit calls; nothing merges as a side effect of eval() or of saving.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional, Union

import torch.nn as nn

from .errors import MergeStateError, NonFiniteError
from .inject import (active_adapters, eject, lora_layers, modules_to_save_wrappers, normalize_active,
                     require_adapter)


@dataclass
class MergeReport:
    """Outcome of merge/unmerge of one adapter. max_restore_error: the largest |W - W_restored| an unmerge
    leaves (0.0 when the merge was exact or the arithmetic round-trips)."""

    adapter: str
    weight: float
    layers: int
    max_restore_error: float
    exact: bool


def merge(model: nn.Module, name: str, weight: float = 1.0, *, safe: bool = True, exact: bool = False) -> MergeReport:
    """Merge adapter `name` (times `weight`) into every base weight it targets.

    safe: check each merged weight for NaN/Inf before writing; on failure every layer already merged is
    restored bit for bit and NonFiniteError is raised (the model is left exactly as it was).  exact: keep the small residual
    that makes a later `unmerge` restore the base bit for bit.
    """
    require_adapter(model, name)
    for _, layer in lora_layers(model):  # refusals that need no arithmetic (DoRA's rules): before any change
        if name in layer.r:
            layer.check_merge(name, weight)
    done = []
    try:
        for key, layer in lora_layers(model):
            if name in layer.r:  # with `safe`, keep exact residuals until all layers passed, for a clean rollback
                layer.merge(name, weight, safe=safe, exact=exact or safe)
                done.append(layer)
    except NonFiniteError as exc:
        for layer in done:
            layer.unmerge(name)
        raise NonFiniteError(f"{exc} (in {key}); the {len(done)} layers merged before it were restored") from None
    if not exact:
        for layer in done:
            layer.merged[name].residual = None
    for _, wrapper in modules_to_save_wrappers(model):
        if name in wrapper.modules_to_save:
            wrapper.merged_name = name
    err = max((layer.merged[name].restore_error for layer in done), default=0.0)
    return MergeReport(name, weight, len(done), 0.0 if exact else err, exact)


def unmerge(model: nn.Module, name: str) -> MergeReport:
    """Take merged adapter `name` out of the base weights again."""
    require_adapter(model, name)
    records = [layer.unmerge(name) for _, layer in lora_layers(model) if name in layer.merged]
    if not records:
        raise MergeStateError(f"adapter {name!r} is not merged")
    for _, wrapper in modules_to_save_wrappers(model):
        if wrapper.merged_name == name:
            wrapper.merged_name = None
    exact = all(r.residual is not None or r.restore_error == 0.0 for r in records)
    err = 0.0 if exact else max(r.restore_error for r in records)
    return MergeReport(name, records[0].weight, len(records), err, exact)


def merged_adapters(model: nn.Module) -> list[str]:
    """Names of adapters currently merged into the base."""
    return sorted({n for _, layer in lora_layers(model) for n in layer.merged})


def merge_and_unload(
    model: nn.Module, adapters: Union[str, Sequence[str], Mapping[str, float], None] = None, *, safe: bool = True
) -> nn.Module:
    """Merge the given adapters (default: the active ones, with their weights) and remove all LoRA wrappers,
    leaving a plain model whose weights are W' = W + sum_i w_i * delta_i."""
    chosen: list[tuple[str, float]] = active_adapters(model) if adapters is None else normalize_active(adapters)
    if not chosen:
        raise MergeStateError("no adapter to merge: none is active and none was named")
    already = set(merged_adapters(model))
    for n, w in chosen:
        if n not in already:
            merge(model, n, w, safe=safe)
    return eject(model)


def restore_error(model: nn.Module, name: Optional[str] = None) -> float:
    """Largest restore error an unmerge of `name` (or of any merged adapter) would leave right now."""
    errs = [rec.restore_error if rec.residual is None else 0.0
            for _, layer in lora_layers(model) for n, rec in layer.merged.items() if name in (None, n)]
    return max(errs, default=0.0)
