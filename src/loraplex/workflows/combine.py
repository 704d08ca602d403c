"""Combine several LoRA adapters into one new adapter. Works on the files alone: no base model is loaded.

Per target module, adapter i contributes its delta in LoRA layout, with its own r, alpha, rsLoRA,
rank_pattern and alpha_pattern folded into its scale s_i (`config.rank_for/alpha_for` + `functional.scaling`):
    A_i: (r_i, in[, *k])    B_i: (out, r_i[, 1, 1])    D_i = s_i * B_i @ A_i : (out, in * prod(k))
Embeddings are combined as B @ A, i.e. (dim, vocab), the transpose of the embedding layout; every method below
is elementwise or an SVD, so the layout does not change the result. The new adapter has scale 1 in every
module (lora_alpha = r, no rsLoRA), so its delta is B_out @ A_out. With weights w_i:

    cat      A_out = [A_1; A_2; ...] (rows)      B_out = [w_1 s_1 B_1, w_2 s_2 B_2, ...] (columns)
             => B_out @ A_out == sum_i w_i D_i exactly; rank = sum_i r_i. A negative w_i only flips B_i.
    linear   (PEFT's "linear"; ranks must be equal)       c_i = sqrt(|w_i| * s_i)
             A_out = sum_i c_i A_i                        B_out = sum_i sign(w_i) c_i B_i
             => B_out @ A_out = sum_i w_i D_i + sum_{i != j} sign(w_i) c_i c_j B_i @ A_j: NOT the sum of deltas
             (the cross terms vanish only when all but one weight are 0). Report error = its distance from it.
    svd      truncated SVD of sum_i w_i D_i, computed from the cat factors by QR (never formed densely):
             U S V^T -> B_out = U[:, :r] * S[:r], A_out = V^T[:r] (all of S in B, A has orthonormal rows)
    magnitude_prune  sum_i w_i * P_i(D_i)        P_i keeps the k = ceil(density * numel) largest |values|
    dare_linear      sum_i w_i * D_i * M_i / density     M_i ~ Bernoulli(density), see `dare_mask`
    ties             T_i = w_i * P_i(D_i); e = +1 where sum_i T_i >= 0 else -1 (the elected sign);
                     out = sum_i T_i * [sign(T_i) == e] / max(1, #{i : sign(T_i) == e})   (disjoint mean)
    dare_ties        as ties with T_i = w_i * D_i * M_i / density
    The four pruning methods then keep the best rank-r approximation of that dense result (extract's
    `best_low_rank`: eigenvectors of its smaller Gram matrix; the factor on the smaller side is orthonormal).
    For svd and these, `rank` (default: the largest input rank at the module) is an upper bound: a module gets
    min(rank, out, in * prod(k)) and for svd at most sum_i r_i, the rank of the exact sum.
    Report error = relative Frobenius truncation error ||target - B_out @ A_out||_F / ||target||_F.

modules_to_save copies are whole weights, not deltas: they are combined as sum_i w_i M_i, and only when every
adapter carries the same copies and the weights sum to 1 (a weighted average); otherwise refused.
DoRA adapters (use_dora) are refused: each rescales W + its own delta by its own magnitude, so no sum of deltas
(and no single magnitude) reproduces a weighted mix of them; merge one into the base instead (loraplex.merge).
With union=True a module some adapters do not target counts as a zero delta for them. Inputs must share one
base: their loraplex base fingerprints must agree (inputs without one, e.g. written by PEFT, are not checked),
and the full base-weight copies PEFT saves with embedding targets (`*.base_layer.weight`) must be equal; those
copies are not written (the base has them). The per-module rules are combine_methods.py's; this module reads and
checks the inputs and assembles the new adapter.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch

from ..errors import (BaseMismatchError, ConfigError, IncompatibleAdaptersError, ShapeMismatchError,
                     UnsupportedFeatureError)
from .combine_methods import (  # noqa: F401  (the masks: importable from here, as before)
    ModuleLora, cat_factors, dare_mask, linear_factors, magnitude_mask, pruned_sum, svd_of_product, truncate,
)
from .extract import COMPUTE, adapter_config, best_low_rank, grouped_rows, new_adapter, write_adapter
from ..identity import PROBE_RTOL
from ..report import format_table
from ..store import AdapterFile, factor_keys, lora_modules, read_adapter, unread_keys
from ..outputs import PathLike

METHODS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")
PRUNING = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
_ERROR_MEANING = {"cat": "exact by construction", "linear": "relative distance from sum_i w_i D_i",
                  "svd": "relative truncation error vs sum_i w_i D_i"}


@dataclass
class ModuleRow:
    module: str
    kind: str  # "linear" | "embedding" | "conv"
    rank: int
    error: float  # relative Frobenius error, meaning per method (CombineReport.error_meaning)


@dataclass
class CombineReport:
    """What `combine` did: inputs, options, and per module the rank written and the error made."""

    method: str
    weights: list[float]
    sources: list[dict[str, Any]]  # [{"path", "content_hash"}] in input order
    density: Optional[float] = None
    rank: Optional[int] = None
    seed: int = 0
    union: bool = False
    modules: list[ModuleRow] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)  # averaged copy tensors

    @property
    def error_meaning(self) -> str:
        return _ERROR_MEANING.get(self.method, "relative truncation error of the final SVD vs the merged delta")

    @property
    def max_error(self) -> float:
        return max((m.error for m in self.modules), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "max_error": self.max_error, "error_meaning": self.error_meaning}

    def table(self, per_module: bool = False) -> str:
        """Modules grouped by name with layer numbers as '*' (or one row each), rank and error."""
        rows = [row for row, _ in grouped_rows(self.modules, per_module)]
        head = (f"method {self.method}, weights {self.weights}"
                + (f", density {self.density}" if self.density is not None else "")
                + (f", rank {self.rank}" if self.rank is not None else "") + (", union" if self.union else ""))
        tail = f"max error {self.max_error:.3g} ({self.error_meaning})"
        if self.modules_to_save:
            tail += f"; modules_to_save averaged: {self.modules_to_save}"
        return "\n".join([head, format_table(rows, ["modules", "count", "kind", "rank", "error"]), tail])


@dataclass
class CombineResult(AdapterFile):
    """The new adapter (an AdapterFile: `load_adapter(model, result)` works before saving) plus its report.
    `path` is a label like '<combined:cat>' until `save_combined` writes it."""

    report: Optional[CombineReport] = None


# -- the combination ------------------------------------------------------------------------------------------
def combine(adapters: Sequence[Union[AdapterFile, PathLike]], weights: Sequence[float], method: str = "cat", *,
            density: Optional[float] = None, rank: Optional[int] = None, seed: int = 0,
            union: bool = False) -> CombineResult:
    """A new adapter from `adapters` (directories or AdapterFiles) with `weights`, by `method` (module docstring).

    density: fraction kept, in (0, 1], required by ties/dare_linear/dare_ties/magnitude_prune and refused by
    the others. rank: output rank bound for svd and the pruning methods. seed: DARE's masks. union: combine
    over the union of target modules instead of refusing adapters that target different modules.
    """
    afs = [a if isinstance(a, AdapterFile) else read_adapter(a) for a in adapters]
    dora = [str(af.path) for af in afs if af.config.use_dora]
    if dora:
        raise UnsupportedFeatureError(
            f"cannot combine DoRA adapters {dora}: each rescales its rows by its own magnitude, so no combination "
            "rule is defined for them; combine plain LoRA adapters, or merge one DoRA adapter into the base"
        )
    weights = _check_args(afs, weights, method, density, rank)
    fingerprint = _common_base(afs)
    parsed = [_split(af) for af in afs]
    seen: dict[str, torch.Tensor] = {}
    for af, (_, _, base_copies) in zip(afs, parsed):
        for key, t in base_copies.items():
            if not torch.equal(seen.setdefault(key, t), t):
                raise BaseMismatchError(f"adapters carry different copies of the base weight {key!r} (different bases, "
                                        f"or a resized vocabulary?); {str(af.path)!r} differs from an earlier input")
    loras = [p[0] for p in parsed]
    tensors: dict[str, torch.Tensor] = {}
    rows = []
    for module in _module_plan(afs, loras, union):
        present = [(i, lr[module]) for i, lr in enumerate(loras) if module in lr]
        _check_shapes(module, present, afs)
        mods, ws = [x for _, x in present], [weights[i] for i, _ in present]
        a_cat, b_cat = cat_factors(mods, ws)
        if method == "cat":
            a, b, err = a_cat, b_cat, 0.0
        elif method == "linear":
            a, b, err = linear_factors(module, present, ws, [str(af.path) for af in afs], a_cat, b_cat)
        else:
            r = rank or max(x.a.shape[0] for x in mods)
            if method == "svd":
                a, b, err = truncate(*svd_of_product(b_cat, a_cat), r)
            else:
                a, b, err = best_low_rank(pruned_sum(method, module, present, ws, density, seed), r)
        first = mods[0]
        dtype = _promote([t.dtype for x in mods for t in (x.a, x.b)])
        a = a.reshape(a.shape[0], *first.a.shape[1:]).to(dtype)  # (r_out, in[, *k])
        b = b.reshape(b.shape[0], b.shape[1], *first.b.shape[2:]).to(dtype)  # (out, r_out[, 1, 1])
        ka, kb = factor_keys(module, first.kind == "embedding")
        tensors[ka], tensors[kb] = a, b
        rows.append(ModuleRow(module, first.kind, a.shape[0], float(err)))
    copies = _average_copies(afs, [p[1] for p in parsed], weights)
    tensors.update(copies)
    config = adapter_config(
        {row.module: row.rank for row in rows}, fan_in_fan_out=any(af.config.fan_in_fan_out for af in afs),
        modules_to_save=sorted({m for af in afs for m in af.config.modules_to_save or []}) if copies else None,
        task_type=_common([af.config.task_type for af in afs]),
        base_model_name_or_path=_common([af.config.base_model_name_or_path for af in afs]))
    report = CombineReport(method, weights, [{"path": str(af.path), "content_hash": af.content_hash} for af in afs],
                           density, rank, seed, union, rows, sorted(copies))
    af = new_adapter(config, tensors, fingerprint, f"<combined:{method}>")
    return CombineResult(**{f.name: getattr(af, f.name) for f in dataclasses.fields(AdapterFile)}, report=report)


# -- checks and bookkeeping -----------------------------------------------------------------------------------
def _check_args(afs: list[AdapterFile], weights: Sequence[float], method: str, density: Optional[float],
                rank: Optional[int]) -> list[float]:
    if method not in METHODS:
        raise ConfigError(f"unknown combine method {method!r}; expected one of {METHODS}")
    if not afs:
        raise ConfigError("no adapter given to combine")
    weights = list(weights)
    if len(weights) != len(afs):
        raise ConfigError(f"got {len(afs)} adapters but {len(weights)} weights; give one weight per adapter")
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
        raise ConfigError(f"weights must be finite numbers, got {weights}")
    if method in PRUNING:
        if density is None or isinstance(density, bool) or not isinstance(density, (int, float)) \
                or not 0 < density <= 1:
            raise ConfigError(f"method {method!r} needs density in (0, 1] (the fraction of each delta kept), "
                              f"got {density!r}")
    elif density is not None:
        raise ConfigError(f"density applies only to {PRUNING}, not to method {method!r}")
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            raise ConfigError(f"rank must be a positive integer, got {rank!r}")
        if method in ("cat", "linear"):
            raise ConfigError(f"method {method!r} takes its rank from the inputs; rank applies to svd and {PRUNING}")
    return [float(w) for w in weights]


def _common_base(afs: list[AdapterFile]) -> Optional[dict[str, Any]]:
    """The base fingerprint the inputs agree on (inputs without one, e.g. written by PEFT, are not checked)."""
    known = [af for af in afs if af.base_fingerprint]
    for af in known[1:]:
        ref, fp = known[0].base_fingerprint, af.base_fingerprint
        p, q = ref.get("probe", []), fp.get("probe", [])
        dist = math.sqrt(sum((x - y) ** 2 for x, y in zip(p, q))) / (math.sqrt(sum(x * x for x in p)) or 1.0)
        if fp.get("structure") != ref.get("structure") or len(p) != len(q) or dist > PROBE_RTOL:
            raise BaseMismatchError(
                f"adapters {str(known[0].path)!r} and {str(af.path)!r} were made for different base models "
                f"(structure {ref.get('structure')} vs {fp.get('structure')}, probe distance {dist:.3g}); "
                "their deltas apply to unrelated weights. Combine adapters of one base only.")
    return known[0].base_fingerprint if known else None


def _split(af: AdapterFile) -> tuple[dict[str, ModuleLora], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """({module: ModuleLora}, {key: modules_to_save copy}, {key: base weight copy}) of one adapter; refuses tensors of
    unknown role. Base weight copies (PEFT's save_embedding_layers) must agree between inputs and are not written."""
    cfg = af.config
    if cfg.bias != "none":
        raise UnsupportedFeatureError(f"adapter {str(af.path)!r} trains biases (bias={cfg.bias!r}); combine handles "
                                      "LoRA factors and modules_to_save copies only")
    modules = lora_modules(af)
    copies, base_copies = {}, {}
    for key in unread_keys(af, modules):
        t = af.tensors[key]
        if any(key.startswith(m + ".") or f".{m}." in key for m in cfg.modules_to_save or []):
            copies[key] = t
        elif key.endswith(".base_layer.weight"):  # PEFT's save_embedding_layers: a copy of the base weight
            base_copies[key] = t
        else:
            raise UnsupportedFeatureError(f"adapter {str(af.path)!r} holds {key!r}, neither a LoRA factor nor a "
                                          "modules_to_save copy; combine cannot tell what it means")
    loras = {module: ModuleLora("embedding" if x.embedding else "conv" if x.a.ndim > 2 else "linear", x.a, x.b, x.scale)
             for module, x in modules.items()}
    return loras, copies, base_copies


def _module_plan(afs: list[AdapterFile], loras: list[dict[str, ModuleLora]], union: bool) -> list[str]:
    every = set().union(*loras)
    if not union:
        lacking = [(af, sorted(every - set(lr))) for af, lr in zip(afs, loras) if every - set(lr)]
        if lacking:
            detail = "; ".join(f"{str(af.path)!r} lacks {len(ms)}, e.g. {ms[:4]}" for af, ms in lacking)
            raise IncompatibleAdaptersError(f"the adapters target different modules: {detail}. Pass union=True "
                                            "(CLI --union) to combine over the union, a missing delta counting as 0")
    return sorted(every)


def _check_shapes(module: str, present: list[tuple[int, ModuleLora]], afs: list[AdapterFile]) -> None:
    def sig(x: ModuleLora) -> tuple:
        return x.kind, tuple(x.a.shape[1:]), x.b.shape[0], tuple(x.b.shape[2:])

    sigs = {str(afs[i].path): sig(x) for i, x in present}
    if len(set(sigs.values())) > 1:
        raise ShapeMismatchError(f"module {module!r} differs between adapters as (kind, A shape after rank, "
                                 f"out, B kernel): {sigs}; were they made for the same base?")


def _average_copies(afs: list[AdapterFile], copies: list[dict[str, torch.Tensor]],
                    weights: list[float]) -> dict[str, torch.Tensor]:
    """modules_to_save copies: sum_i w_i M_i when every adapter has the same copies and sum_i w_i == 1."""
    if not any(copies):
        return {}
    keys = [sorted(c) for c in copies]
    if any(k != keys[0] for k in keys):
        detail = {str(af.path): k for af, k in zip(afs, keys)}
        raise UnsupportedFeatureError(f"the adapters replace different modules (modules_to_save copies {detail}); a "
                                      "missing copy stands for the base's own module, which combine does not read")
    if abs(sum(weights) - 1.0) > 1e-6:
        raise UnsupportedFeatureError(f"modules_to_save copies {keys[0]} are whole weights, not deltas, so they are "
                                      f"averaged: the weights must sum to 1, got {weights} (sum {sum(weights):g})")
    out = {}
    for key in keys[0]:
        ts = [c[key] for c in copies]
        if len({tuple(t.shape) for t in ts}) > 1:
            raise ShapeMismatchError(f"modules_to_save copy {key!r} has shapes {[tuple(t.shape) for t in ts]}")
        out[key] = sum(w * t.to(COMPUTE) for w, t in zip(weights, ts)).to(ts[0].dtype)
    return out


def _promote(dtypes: list[torch.dtype]) -> torch.dtype:
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


def _common(values: list[Any]) -> Any:
    return values[0] if len(set(map(str, values))) == 1 else None


def save_combined(result: CombineResult, out_dir: PathLike, *, overwrite: bool = False) -> CombineResult:
    """Write a combined adapter (PEFT-loadable) plus loraplex_combine.json; returns it with `path` = out_dir.
    An existing non-empty `out_dir` is replaced (atomically) only with `overwrite`; an input adapter never."""
    inputs = [s["path"] for s in result.report.sources] if result.report else []
    path = write_adapter(result, out_dir, "combine", result.report.to_dict() if result.report else {},
                         overwrite=overwrite, inputs=inputs)
    return dataclasses.replace(result, path=path)
