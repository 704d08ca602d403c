"""Extract a LoRA adapter from a fully fine-tuned model: a truncated SVD of W_ft - W_base per target module.

Per target module, the delta in LoRA layout (as in combine.py):
    nn.Linear      D = W_ft - W_base                     (out, in)
    GPT-2 Conv1D   D = (W_ft - W_base).T                 weights are stored (in, out) -> (out, in)
    nn.Embedding   D = (W_ft - W_base).T                 (vocab, dim) -> (dim, vocab)
    nn.Conv1d/2d   D = (W_ft - W_base).flatten(1)        (out, in, *k) -> (out, in * prod(k))
    B @ A = the best rank-r approximation of D (truncated SVD D = U S V^T, see `best_low_rank`), B (out, r),
    A (r, in); r = `rank`, or the smallest r with sum_{j<r} S_j^2 >= energy * sum_j S_j^2 (capped by `rank`)
    error = ||D - B @ A||_F / ||D||_F  (= sqrt(sum_{j>=r} S_j^2 / sum_j S_j^2)), measured on the result
The adapter has scale 1 per module (lora_alpha = r) and rank_pattern where ranks differ (`adapter_config`).
The helpers at the end (new adapters from computed factors, and their files) also serve combine.py.
Modules whose weights did not change are left out; other changed parameters (norms, biases, untargeted weights)
cannot be expressed as LoRA and are listed in the report as `not_captured`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn as nn
from safetensors.torch import save_file

from .. import __version__
from ..config import LoraConfig
from ..errors import (BaseMismatchError, ConfigError, NonFiniteError, ShapeMismatchError, TargetNotFoundError,
                     UnsupportedModuleError)
from ..functional import Conv1D, delta_weight, out_in, weight_layout
from ..identity import base_fingerprint, content_hash
from ..inject import find_targets
from ..models import base_name
from ..report import format_table
from ..outputs import PathLike, atomic_directory, write_json
from ..store import CONFIG_NAME, PREFIX, WEIGHTS_NAME, AdapterFile, factor_keys, is_causal_lm

COMPUTE = torch.float64  # SVD and combination arithmetic (also combine.py's); results are cast back


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
        rows = [row + [f"{min(m.energy for m in ms):.4f}"] for row, ms in grouped_rows(self.modules, per_module)]
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
        conv1d = conv1d or (kind == "linear" and weight_layout(module) == "in_out")
        a, b, err = best_low_rank(delta.flatten(1), rank, energy)  # (r, in'), (out, r)
        r = a.shape[0]
        dtype = torch.promote_types(module.weight.dtype, torch.float32)
        a = a.reshape(r, *delta.shape[1:])  # (r, in[, *k])
        b = b.reshape(delta.shape[0], r, *([1] * (delta.ndim - 2)))  # (out, r[, 1, 1])
        ka, kb = factor_keys(key, kind == "embedding")
        tensors[ka], tensors[kb] = a.to(dtype), b.to(dtype)
        ranks[key] = r
        report.modules.append(ExtractRow(key, kind, r, err, 1.0 - err * err))
    if not ranks:
        raise ConfigError(f"nothing to extract: every target ({len(keys)} modules) has the base's weights")
    targeted = {f"{k}.weight" for k in keys}
    ft_params = dict(finetuned_model.named_parameters())
    report.not_captured = [n for n, p in base_model.named_parameters()
                           if n not in targeted and n in ft_params and not torch.equal(p, ft_params[n])]
    config = adapter_config(ranks, fan_in_fan_out=conv1d, base_model_name_or_path=base_name(base_model),
                            task_type="CAUSAL_LM" if is_causal_lm(base_model) else None)  # as save_adapter writes
    return new_adapter(config, tensors, fingerprint, "<extracted>"), report


def best_low_rank(d: torch.Tensor, rank: Optional[int], energy: Optional[float] = None
                  ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best rank-r approximation B @ A of a 2-D float64 `d` (out, in) and its relative Frobenius error
    ||d - B @ A||_F / ||d||_F, measured on the result. r = min(rank, out, in), lowered to the smallest rank whose
    top squared singular values reach `energy` of their sum. Computed from the eigenvectors Q of the Gram matrix of
    the smaller side (cheaper than a full SVD): out <= in: d d^T = U S^2 U^T, B = U_r, A = U_r^T d (S rides in A);
    else d^T d = V S^2 V^T, A = V_r^T, B = d V_r (S rides in B). Returns (A (r, in), B (out, r), error)."""
    wide = d.shape[0] <= d.shape[1]
    evals, q = torch.linalg.eigh(d @ d.T if wide else d.T @ d)  # ascending
    evals, q = evals.flip(0).clamp(min=0), q.flip(1)
    r = evals.shape[0] if rank is None else min(rank, evals.shape[0])
    total = float(evals.sum())
    if energy is not None and total > 0:
        r = min(r, int((torch.cumsum(evals, 0) / total < energy - 1e-12).sum()) + 1)
    q = q[:, :r]
    a, b = (q.T @ d, q) if wide else (q.T, d @ q)
    norm = float(d.norm())
    return a, b, float((d - delta_weight(a, b, 1.0)).norm()) / norm if norm > 0 else 0.0


def _delta(key: str, base: nn.Module, ft: nn.Module) -> tuple[str, torch.Tensor]:
    """(kind, W_ft - W_base in LoRA layout, float64); conv deltas keep their (out, in, *k) shape."""
    w0, w1 = base.weight.detach().to(COMPUTE), ft.weight.detach().to(COMPUTE)
    if w0.shape != w1.shape:
        raise ShapeMismatchError(f"{key!r}: base weight {tuple(w0.shape)} vs fine-tuned {tuple(w1.shape)}")
    d = w1 - w0
    if isinstance(base, nn.Linear) or (Conv1D is not None and isinstance(base, Conv1D)):
        return "linear", out_in(d, weight_layout(base))
    if isinstance(base, nn.Embedding):
        return "embedding", d.T
    if isinstance(base, (nn.Conv1d, nn.Conv2d)) and base.groups == 1:
        return "conv", d
    raise UnsupportedModuleError(f"cannot extract LoRA for {key!r}, a {type(base).__name__}; supported: nn.Linear, "
                                 "transformers Conv1D, nn.Embedding, nn.Conv1d/2d (groups=1)")


def grouped_rows(modules: Sequence[Any], per_module: bool) -> list[tuple[list[Any], list[Any]]]:
    """Table rows [name, count, kind, rank or 'lo-hi', max error] over rows with .module/.kind/.rank/.error,
    grouped by module name with layer numbers as '*' (unless per_module), each with its group's rows."""
    groups: dict[str, list[Any]] = {}
    for m in modules:
        groups.setdefault(m.module if per_module else re.sub(r"\.\d+(?=\.|$)", ".*", m.module), []).append(m)
    out = []
    for name, ms in groups.items():
        lo, hi = min(m.rank for m in ms), max(m.rank for m in ms)
        rank = lo if lo == hi else f"{lo}-{hi}"
        out.append(([name, len(ms), ms[0].kind, rank, f"{max(m.error for m in ms):.3g}"], ms))
    return out


# -- new adapters from computed factors, and their files (shared with combine.py) ------------------------------------
def adapter_config(ranks: dict[str, int], **fields: Any) -> LoraConfig:
    """Config of a scale-1 adapter with per-module `ranks`: target_modules = the exact module names, lora_alpha
    = r in every module (alpha / r = 1, no rsLoRA); the most common rank is `r`, the others go to rank_pattern and
    alpha_pattern under the escaped module name, e.g. {'model\\.layers\\.0\\.self_attn\\.q_proj': 16}."""
    counts = Counter(ranks.values())
    r0 = max(counts, key=lambda r: (counts[r], r))
    pattern = {re.escape(m): r for m, r in sorted(ranks.items()) if r != r0}
    return LoraConfig(r=r0, lora_alpha=r0, target_modules=sorted(ranks), rank_pattern=pattern,
                      alpha_pattern=dict(pattern), **fields)


def new_adapter(config: LoraConfig, tensors: dict[str, torch.Tensor], fingerprint: Optional[dict[str, Any]],
                label: str) -> AdapterFile:
    """An in-memory AdapterFile (model-relative keys) with the content hash `read_adapter` will compute."""
    # canonical strides: slices of SVD factors can be "contiguous" with a size-1 dim of stride != 1
    tensors = {k: t.clone(memory_format=torch.contiguous_format) for k, t in tensors.items()}
    bad = [k for k, t in tensors.items() if not torch.isfinite(t).all()]
    if bad:
        raise NonFiniteError(f"the new adapter would hold NaN/Inf in {bad[:3]}; nothing was written")
    raw = json.loads(json.dumps(config.to_dict(), default=str))
    digest = content_hash(raw, {PREFIX + k: t for k, t in tensors.items()})
    return AdapterFile(Path(label), config, tensors, digest, fingerprint, __version__, raw)


def write_adapter(af: AdapterFile, out_dir: PathLike, record_name: str, record: dict[str, Any], *,
                  overwrite: bool = False, inputs: Sequence[PathLike] = ()) -> Path:
    """Write `af` in PEFT's layout, atomically, with loraplex's metadata (version, content hash, base
    fingerprint, and `record` under 'loraplex.<record_name>') and `record` again as loraplex_<record_name>.json.
    An existing non-empty `out_dir` is replaced only with `overwrite`, one of `inputs` never (outputs.check_output)."""
    meta = {"format": "pt", "loraplex.version": __version__, "loraplex.content_hash": af.content_hash,
            f"loraplex.{record_name}": json.dumps({k: v for k, v in record.items() if k != "modules"}, default=str)}
    if af.base_fingerprint:
        meta["loraplex.base_fingerprint"] = json.dumps(af.base_fingerprint)
    with atomic_directory(out_dir, overwrite=overwrite, inputs=inputs) as tmp:
        save_file({PREFIX + k: t for k, t in af.tensors.items()}, str(tmp / WEIGHTS_NAME), metadata=meta)
        write_json(tmp / CONFIG_NAME, af.raw_config)
        write_json(tmp / f"loraplex_{record_name}.json", record)
    return Path(out_dir)


def save_extracted(adapter: AdapterFile, report: ExtractReport, out_dir: PathLike, *,
                   overwrite: bool = False) -> AdapterFile:
    """Write the extracted adapter (PEFT layout) plus loraplex_extract.json; returns it with `path` = out_dir.
    An existing non-empty `out_dir` is replaced (atomically) only with `overwrite`."""
    path = write_adapter(adapter, out_dir, "extract", report.to_dict(), overwrite=overwrite)
    return dataclasses.replace(adapter, path=path)
