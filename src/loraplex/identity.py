"""Identity of adapters and bases: a content hash for adapters, a fingerprint for the base they were made for.

content hash: sha256 over the adapter's semantic config fields and every tensor (name, dtype, shape, bytes),
    so two adapters with equal hashes compute the same function; names never count.
base fingerprint: {"structure": sha256 of the base's weight-bearing module names and logical shapes,
    "probe": a few weight values from sampled modules}. Two bases match when the structure is equal and the
    probe values agree within 5% (robust to fp32/bf16/quantized copies of the same weights).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any, Optional

import torch
import torch.nn as nn

from .errors import BaseMismatchError
from .layers import LoraLayer

_SEMANTIC_FIELDS = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "fan_in_fan_out",
                    "modules_to_save", "bias")
PROBE_MODULES = 8
PROBE_VALUES = 4
PROBE_RTOL = 0.05


def content_hash(config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 (hex) of the adapter's semantics: selected config fields + all tensors in key order."""
    h = hashlib.sha256()
    h.update(json.dumps({k: config.get(k) for k in _SEMANTIC_FIELDS}, sort_keys=True, default=str).encode())
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().reshape(-1).contiguous()  # 1-D: any stride, 0-dim too
        h.update(f"{key}|{t.dtype}|{tuple(tensors[key].shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _logical_weights(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, weight) of the bare base's weight-bearing modules: LoRA wrappers are seen through and merged
    adapters subtracted, so the fingerprint of a base does not change when adapters are injected or merged."""
    out = []
    inside_lora: list[str] = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if any(p.startswith("lora_") or p == "modules_to_save" for p in parts):
            continue
        clean = ".".join(p for p in parts if p not in ("base_layer", "original_module"))
        if isinstance(module, LoraLayer):
            out.append((clean, module.unmerged_base_weight()))
            inside_lora.append(name + ".")
        elif any(name.startswith(p) for p in inside_lora):
            continue
        elif _is_quantized_leaf(module):
            out.append((clean, module.dequantize()))
        elif isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.ndim >= 2:
            out.append((clean, module.weight))
    return sorted(out, key=lambda kv: kv[0])


def _is_quantized_leaf(module: nn.Module) -> bool:
    """A quantized base layer: a leaf module exposing dequantize() (loraplex.quant's QuantLinear)."""
    return callable(getattr(module, "dequantize", None)) and next(module.children(), None) is None


def base_fingerprint(model: nn.Module) -> dict[str, Any]:
    """Fingerprint of the base under any adapters (see module docstring)."""
    with torch.no_grad():
        weights = _logical_weights(model)
        shapes = [(n, list(w.shape)) for n, w in weights]
        structure = hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:32]
        step = max(1, len(weights) // PROBE_MODULES)
        probe = []
        for _, w in weights[::step][:PROBE_MODULES]:
            probe.extend(float(v) for v in w.detach().flatten()[:PROBE_VALUES].float().cpu())
    return {"structure": structure, "probe": probe}


def check_base(expected: Optional[Mapping[str, Any]], model: nn.Module, what: str = "adapter") -> None:
    """Raise BaseMismatchError unless `model` is the base `expected` was recorded on (None: nothing to check)."""
    if not expected:
        return
    got = base_fingerprint(model)
    if got["structure"] != expected.get("structure"):
        raise BaseMismatchError(
            f"{what} was made for a different base model: its architecture fingerprint is "
            f"{expected.get('structure')}, this base's is {got['structure']} (different layers or shapes). "
            "Load it on the base it was trained on, or pass check_base_model=False (CLI: --no-check-base) to skip this check."
        )
    p, q = expected.get("probe", []), got["probe"]
    num = math.sqrt(sum((a - b) ** 2 for a, b in zip(p, q)))
    den = math.sqrt(sum(a * a for a in p)) or 1.0
    if len(p) != len(q) or num / den > PROBE_RTOL:
        raise BaseMismatchError(
            f"{what} was made for a base with the same architecture but different weights (relative probe "
            f"distance {num / den:.3g} > {PROBE_RTOL}). Load it on the base it was trained on, or pass "
            "check_base_model=False (CLI: --no-check-base) to skip this check."
        )
