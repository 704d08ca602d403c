"""Extract a LoRA adapter from a fully fine-tuned model: a truncated SVD of W_ft - W_base per target module.

Per target module, the delta in LoRA layout (as in combine.py):
    nn.Linear      D = W_ft - W_base                     (out, in)
    GPT-2 Conv1D   D = (W_ft - W_base).T                 weights are stored (in, out) -> (out, in)
    nn.Embedding   D = (W_ft - W_base).T                 (vocab, dim) -> (dim, vocab)
    nn.Conv1d/2d   D = (W_ft - W_base).flatten(1)        (out, in, *k) -> (out, in * prod(k))
    D = U S V^T;  r = `rank`, or the smallest r with sum_{j<r} S_j^2 >= energy * sum_j S_j^2 (capped by `rank`)
    B = U[:, :r] * S[:r]  (out, r)     A = V^T[:r]  (r, in)     error = sqrt(sum_{j>=r} S_j^2 / sum_j S_j^2)
The adapter has scale 1 per module (lora_alpha = r) and rank_pattern where ranks differ (combine.adapter_config).
Modules whose weights did not change are left out; other changed parameters (norms, biases, untargeted weights)
cannot be expressed as LoRA and are listed in the report as `not_captured`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import torch.nn as nn

from .combine import COMPUTE, adapter_config, new_adapter, write_adapter
from .config import LoraConfig
from .errors import BaseMismatchError, ConfigError, ShapeMismatchError, TargetNotFoundError, UnsupportedModuleError
from .identity import base_fingerprint
from .inject import find_targets
from .layers import Conv1D
from .models import base_name
from .report import format_table
from .store import AdapterFile

PathLike = Union[str, os.PathLike]


@dataclass
class ExtractRow:
    module: str
    kind: str  # "linear" | "embedding" | "conv"
    rank: int
    error: float  # relative Frobenius error of the truncation, ||D - B @ A||_F / ||D||_F
    energy: float  # fraction of ||D||_F^2 kept


@dataclass
class ExtractReport:
    rank: Optional[int]
    energy: Optional[float]
    modules: list[ExtractRow] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)  # targets whose weight equals the base's (left out)
    not_captured: list[str] = field(default_factory=list)  # changed parameters LoRA cannot express

    @property
    def max_error(self) -> float:
        return max((m.error for m in self.modules), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "max_error": self.max_error}

    def table(self, per_module: bool = False) -> str:
        groups: dict[str, list[ExtractRow]] = {}
        for m in self.modules:
            groups.setdefault(m.module if per_module else re.sub(r"\.\d+(?=\.|$)", ".*", m.module), []).append(m)
        rows = []
        for name, ms in groups.items():
            lo, hi = min(m.rank for m in ms), max(m.rank for m in ms)
            rows.append([name, len(ms), ms[0].kind, lo if lo == hi else f"{lo}-{hi}",
                         f"{max(m.error for m in ms):.3g}", f"{min(m.energy for m in ms):.4f}"])
        lines = [format_table(rows, ["modules", "count", "kind", "rank", "max error", "min energy"]),
                 f"max relative error {self.max_error:.3g}"]
        if self.unchanged:
            lines.append(f"unchanged (left out): {len(self.unchanged)} modules, e.g. {self.unchanged[:3]}")
        if self.not_captured:
            lines.append(f"changed but not captured by LoRA: {self.not_captured[:6]}"
                         + (f" and {len(self.not_captured) - 6} more" if len(self.not_captured) > 6 else ""))
        return "\n".join(lines)


def extract_lora(base_model: nn.Module, finetuned_model: nn.Module, *, rank: Optional[int] = None,
                 energy: Optional[float] = None, targets: Union[str, list[str]] = "all-linear"
                 ) -> tuple[AdapterFile, ExtractReport]:
    """An adapter approximating finetuned - base on `targets` (target_modules syntax: names, a regex, or
    'all-linear'), at a fixed `rank` or the smallest rank keeping the `energy` fraction (module docstring).
    Neither model is modified."""
    if rank is None and energy is None:
        raise ConfigError("give rank (a fixed rank per module) or energy (fraction of ||delta||^2 to keep), or both")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise ConfigError(f"rank must be a positive integer, got {rank!r}")
    if energy is not None and not (isinstance(energy, (int, float)) and 0 < energy <= 1):
        raise ConfigError(f"energy must be in (0, 1], got {energy!r}")
    fingerprint = base_fingerprint(base_model)
    if base_fingerprint(finetuned_model)["structure"] != fingerprint["structure"]:
        raise BaseMismatchError("the fine-tuned model's architecture (module names and shapes) differs from the "
                                "base's; extract needs the same model before and after fine-tuning")
    ft_modules = dict(finetuned_model.named_modules())
    report = ExtractReport(rank, energy)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    conv1d = False
    keys = find_targets(base_model, LoraConfig(target_modules=targets))
    for key, module in ((k, base_model.get_submodule(k)) for k in keys):
        ft = ft_modules.get(key)
        if ft is None or type(ft) is not type(module):
            raise TargetNotFoundError(f"the fine-tuned model has no {type(module).__name__} named {key!r}")
        kind, delta = _delta(key, module, ft)
        if not bool(delta.any()):
            report.unchanged.append(key)
            continue
        conv1d = conv1d or (Conv1D is not None and isinstance(module, Conv1D))
        u, s, vh = torch.linalg.svd(delta.flatten(1), full_matrices=False)  # (out, k), (k,), (k, in')
        power = s.pow(2)
        total = float(power.sum())
        r = s.shape[0] if rank is None else min(rank, s.shape[0])
        if energy is not None:
            r = min(r, int((torch.cumsum(power, 0) / total < energy - 1e-12).sum()) + 1)
        dtype = torch.promote_types(module.weight.dtype, torch.float32)
        a = vh[:r].reshape(r, *delta.shape[1:])  # (r, in[, *k])
        b = (u[:, :r] * s[:r]).reshape(delta.shape[0], r, *([1] * (delta.ndim - 2)))  # (out, r[, 1, 1])
        ka, kb = ((f"{key}.lora_embedding_A", f"{key}.lora_embedding_B") if kind == "embedding"
                  else (f"{key}.lora_A.weight", f"{key}.lora_B.weight"))
        tensors[ka], tensors[kb] = a.to(dtype), b.to(dtype)
        ranks[key] = r
        kept = float(power[:r].sum()) / total
        report.modules.append(ExtractRow(key, kind, r, math.sqrt(max(1.0 - kept, 0.0)), kept))
    if not ranks:
        raise ConfigError(f"nothing to extract: every target ({len(keys)} modules) has the base's weights")
    targeted = {f"{k}.weight" for k in keys}
    ft_params = dict(finetuned_model.named_parameters())
    report.not_captured = [n for n, p in base_model.named_parameters()
                           if n not in targeted and n in ft_params and not torch.equal(p, ft_params[n])]
    config = adapter_config(ranks, fan_in_fan_out=conv1d, base_model_name_or_path=base_name(base_model))
    return new_adapter(config, tensors, fingerprint, "<extracted>"), report


def _delta(key: str, base: nn.Module, ft: nn.Module) -> tuple[str, torch.Tensor]:
    """(kind, W_ft - W_base in LoRA layout, float64); conv deltas keep their (out, in, *k) shape."""
    w0, w1 = base.weight.detach().to(COMPUTE), ft.weight.detach().to(COMPUTE)
    if w0.shape != w1.shape:
        raise ShapeMismatchError(f"{key!r}: base weight {tuple(w0.shape)} vs fine-tuned {tuple(w1.shape)}")
    d = w1 - w0
    if isinstance(base, nn.Linear):
        return "linear", d
    if Conv1D is not None and isinstance(base, Conv1D):
        return "linear", d.T
    if isinstance(base, nn.Embedding):
        return "embedding", d.T
    if isinstance(base, (nn.Conv1d, nn.Conv2d)) and base.groups == 1:
        return "conv", d
    raise UnsupportedModuleError(f"cannot extract LoRA for {key!r}, a {type(base).__name__}; supported: nn.Linear, "
                                 "transformers Conv1D, nn.Embedding, nn.Conv1d/2d (groups=1)")


def save_extracted(adapter: AdapterFile, report: ExtractReport, out_dir: PathLike) -> AdapterFile:
    """Write the extracted adapter (PEFT layout) plus loraplex_extract.json; returns it with `path` = out_dir."""
    return dataclasses.replace(adapter, path=write_adapter(adapter, out_dir, "extract", report.to_dict()))
