"""Parity report for an adapter: does every way of running it compute what on-the-fly LoRA in fp32 computes?

reference          base (fp32) + adapter applied on the fly, on a probe set (see probes.py)
variants x dtypes  merged (in memory) | on_the_fly | mixed_batch (per-row routing beside other adapters and
                   base rows) | quantized_int8 / quantized_nf4 (LoRA over a quantized base) | exported (a
                   merged transformers directory, loaded back with plain AutoModelForCausalLM.from_pretrained)
Each row is compared with the reference (probes.compare) and judged by `tolerance_for`:
    exact variants  |v_j - r_j| <= F*atol + F*rtol*max_k|r_k| for every logit of every position (normwise)
                    and  mean KL <= (F*atol)^2 / 2
                    (atol, rtol) = functional.tolerance(dtype), F = END_TO_END_FACTOR; the KL bound is the
                    most a uniform logit error of F*atol can cause (Hoeffding's lemma), so KL is held to the
                    absolute part of the logit tolerance.
    quantized       informational: their error is the base's own quantization error, which depends on the
                    base's weights, not on the adapter; the row shows the bare quantized base's KL beside it.
Golden logits: `record_golden` stores the reference in the adapter directory; `check_golden` re-runs the
stored probes on a deployment and judges it like an exact variant in the deployment's logits dtype.

To add a variant (e.g. the multi-adapter runtime), add one entry to VARIANTS: a function
(ctx, dtype) -> logits (N, T, V) on ctx.probes, raising Unavailable(reason) where it cannot run.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn as nn

from ..device import resolve_device
from ..errors import AdapterFileError, ConfigError, LoraplexError
from .export import DTYPES, export_merged, parse_dtype
from ..functional import tolerance
from ..identity import base_fingerprint
from ..inject import disable_adapters, inject, lora_layers, route_rows
from ..merge import merge_and_unload
from ..models import base_name, load_base
from .probes import (
    Probes, Reference, at_positions, compare, from_pretrained, make_probes, no_progress_bars, read_golden, run_logits,
    write_golden,
)
from ..report import format_table
from ..store import AdapterFile, load_adapter, read_adapter
from ..outputs import PathLike

END_TO_END_FACTOR = 10  # whole-model outputs accumulate per-op rounding over layers: F x the per-op tolerance
ALL_VARIANTS = ("merged", "on_the_fly", "mixed_batch", "quantized_int8", "quantized_nf4", "exported")
DeviceSpec = Union[str, torch.device, None]  # a device.resolve_device spec ('cpu', 'cuda:1', 'auto'), or None


@dataclass(frozen=True)
class Tolerance:
    """Pass rule of one row: |v_j - r_j| <= atol + rtol * max_k |r_k| at every position, and mean KL <= kl.
    required False: informational (INFO, never FAIL)."""

    atol: float
    rtol: float
    kl: float
    required: bool = True

    def text(self) -> str:
        return f"|d|<={self.atol:.2g}+{self.rtol:.2g}max|r|, KL<={self.kl:.2g}" if self.required else "informational"


def tolerance_for(dtype: torch.dtype, required: bool = True) -> Tolerance:
    """The verify tolerance of logits computed in `dtype`, derived from functional.tolerance (module docstring)."""
    atol, rtol = tolerance(dtype)
    a, r = END_TO_END_FACTOR * atol, END_TO_END_FACTOR * rtol
    return Tolerance(a, r, a * a / 2, required)


@dataclass
class Row:
    """One line of the report. status: PASS | FAIL | INFO | UNAVAILABLE (reason in `note`)."""

    variant: str
    dtype: str
    status: str
    required: bool
    max_abs: float = math.nan
    worst_ratio: float = math.nan  # max |d| / (atol + rtol max|r|); <= 1 is within tolerance (NaN for INFO)
    kl: float = math.nan
    agree: float = math.nan  # fraction of positions
    tolerance: str = ""
    note: str = ""


@dataclass
class VerifyReport:
    """Rows of variant x dtype (and golden checks). `passed`: no required row FAILs (UNAVAILABLE is shown,
    not failed). `probes`, `reference` and `context` are kept for record_golden_from."""

    base: str
    adapter: str
    rows: list[Row] = field(default_factory=list)
    probes: Optional[Probes] = field(default=None, repr=False)
    reference: Optional[torch.Tensor] = field(default=None, repr=False)  # (N, T, V) fp32
    context: Optional["Context"] = field(default=None, repr=False)

    @property
    def passed(self) -> bool:
        return not any(r.required and r.status == "FAIL" for r in self.rows)

    @property
    def failures(self) -> list[Row]:
        return [r for r in self.rows if r.required and r.status == "FAIL"]

    def table(self) -> str:
        def num(x: float, fmt: str) -> str:
            return "-" if math.isnan(x) else format(x, fmt)

        rows = [[r.variant, r.dtype, num(r.max_abs, ".3g"), num(r.worst_ratio, ".3g"), num(r.kl, ".3g"),
                 num(100 * r.agree, ".1f") + ("%" if not math.isnan(r.agree) else ""), r.tolerance,
                 r.status + (f": {r.note}" if r.note else "")] for r in self.rows]
        head = ["variant", "dtype", "max|dlogit|", "worst d/tol", "KL(ref||v)", "greedy agree", "tolerance", "result"]
        return format_table(rows, head, align="llrrrrll")

    def summary(self) -> str:
        bad = self.failures
        return "all required checks passed" if not bad else (
            f"{len(bad)} required check(s) FAILED: " + ", ".join(f"{r.variant}/{r.dtype}" for r in bad))


class Unavailable(Exception):
    """Raised by a variant that cannot run on this base/adapter; becomes an UNAVAILABLE row (never silent)."""


@dataclass
class Context:
    """What every variant gets: the pristine fp32 base (copy it, never change it), its tokenizer, the adapter."""

    base: nn.Module
    tokenizer: Any
    adapter: AdapterFile
    probes: Probes
    _bare: Optional[Reference] = None  # the bare fp32 base on the probes, computed on first use

    def bare_reference(self) -> Reference:
        if self._bare is None:
            logits = run_logits(self.base, self.probes)
            self._bare = Reference.from_logits(at_positions(logits, self.probes.attention_mask))
        return self._bare

    def fresh(self, dtype: torch.dtype) -> nn.Module:
        return copy.deepcopy(self.base).to(dtype)

    def with_adapter(self, dtype: torch.dtype, name: str = "verify") -> nn.Module:
        model = self.fresh(dtype)
        load_adapter(model, self.adapter, name)
        return model


# -- variants -----------------------------------------------------------------------------------------------
def _on_the_fly(ctx: Context, dtype: torch.dtype) -> torch.Tensor:
    return run_logits(ctx.with_adapter(dtype), ctx.probes)


def _merged(ctx: Context, dtype: torch.dtype) -> torch.Tensor:
    return run_logits(merge_and_unload(ctx.with_adapter(dtype), "verify"), ctx.probes)


def _mixed_batch(ctx: Context, dtype: torch.dtype) -> torch.Tensor:
    """Each probe row appears three times in one batch: routed to the adapter, to a random decoy adapter with
    the same targets, and to the base alone, in a rotating order; the adapter's rows are returned."""
    model = ctx.with_adapter(dtype)
    decoy = dataclasses.replace(ctx.adapter.config, init_lora_weights=False)
    inject(model, decoy, "decoy", seed=1234, activate=False)
    n = ctx.probes.input_ids.shape[0]
    order = [[("verify", "decoy", None)[(j + i) % 3] for j in range(3)] for i in range(n)]  # (n, 3) assignment
    rows = [i for i in range(n) for _ in range(3)]
    batch = Probes(ctx.probes.input_ids[rows], ctx.probes.attention_mask[rows], ctx.probes.source)
    try:
        with route_rows(model, [a for per_probe in order for a in per_probe]):
            logits = run_logits(model, batch)  # (3n, T, V)
    except ConfigError as exc:  # e.g. modules_to_save adapters cannot be routed per row
        raise Unavailable(str(exc)) from None
    return logits[[3 * i + per_probe.index("verify") for i, per_probe in enumerate(order)]]


def _quantized(scheme: str) -> Callable[[Context, torch.dtype], tuple[torch.Tensor, str]]:
    def run(ctx: Context, dtype: torch.dtype) -> tuple[torch.Tensor, str]:
        try:
            from ..quant import quantize_model

            model = ctx.fresh(dtype)
            quantize_model(model, scheme, compute_dtype=dtype)
            # the fingerprint check would compare quantized weights with the float base's (nf4 moves them by
            # more than its 5% probe tolerance); this copy was made from that very base, so skip it
            load_adapter(model, ctx.adapter, "verify", check_base_model=False)
        except (LoraplexError, NotImplementedError, ImportError) as exc:
            raise Unavailable(f"LoRA over a {scheme} base: {exc}") from None
        with disable_adapters(model):  # context: how far quantization alone moves the bare base
            bare = compare(ctx.bare_reference(), at_positions(run_logits(model, ctx.probes), ctx.probes.attention_mask),
                           1.0, 0.0)
        return run_logits(model, ctx.probes), f"bare quantized base: KL {bare.kl:.3g}, agree {100 * bare.agree:.1f}%"

    return run


def _exported(ctx: Context, dtype: torch.dtype) -> torch.Tensor:
    if not callable(getattr(ctx.base, "save_pretrained", None)):
        raise Unavailable(f"{type(ctx.base).__name__} is not a transformers model (no save_pretrained)")
    name = next(k for k, v in DTYPES.items() if v == dtype)
    with tempfile.TemporaryDirectory(prefix="loraplex-verify-") as tmp:
        with no_progress_bars():
            export_merged(copy.deepcopy(ctx.base), ctx.tokenizer, [ctx.adapter], Path(tmp) / "merged", dtype=name)
        return run_logits(from_pretrained(Path(tmp) / "merged").to(_device_of(ctx.base)), ctx.probes)


@dataclass(frozen=True)
class Variant:
    run: Callable[[Context, torch.dtype], Any]  # -> logits (N, T, V) on ctx.probes, or (logits, note for the row)
    required: bool  # False: informational (no PASS/FAIL)
    doc: str


VARIANTS: dict[str, Variant] = {
    "merged": Variant(_merged, True, "adapter merged into the base weights in memory (merge_and_unload)"),
    "on_the_fly": Variant(_on_the_fly, True, "base + adapter on the fly in this dtype"),
    "mixed_batch": Variant(_mixed_batch, True, "per-row routing: the adapter's rows in a batch with other adapters"),
    "quantized_int8": Variant(_quantized("int8"), False, "LoRA over an int8 base"),
    "quantized_nf4": Variant(_quantized("nf4"), False, "LoRA over an NF4 base"),
    "exported": Variant(_exported, True, "export_merged directory loaded with AutoModelForCausalLM.from_pretrained"),
}


# -- entry points ---------------------------------------------------------------------------------------------
def _base(spec_or_model: Union[str, PathLike, nn.Module], tokenizer: Any, num_layers: Optional[int],
          device: DeviceSpec = None):
    """The pristine fp32 base on `device` (a device.resolve_device spec or torch.device; None: where it is)."""
    if isinstance(spec_or_model, nn.Module):
        if any(True for _ in lora_layers(spec_or_model)):
            raise ConfigError("verify needs the bare base model, but this one carries LoRA layers; pass the base "
                              "it was loaded on (the adapter is given separately)")
        model = copy.deepcopy(spec_or_model).float().eval()
    else:
        model, tok = load_base(spec_or_model, num_layers=num_layers)
        tokenizer = tokenizer if tokenizer is not None else tok
    return (model if device is None else model.to(_resolve(device))), tokenizer


def _resolve(device: Union[str, torch.device]) -> torch.device:
    return device if isinstance(device, torch.device) else resolve_device(device)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _vocab(model: nn.Module) -> int:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int):
        raise ConfigError(f"verify needs a causal LM with config.vocab_size; {type(model).__name__} has none")
    return vocab


def judge(row: Row, ref: Reference, logits: torch.Tensor, mask: torch.Tensor, tol: Tolerance) -> Row:
    """Fill `row` with the comparison of `logits` (at the unmasked positions) to `ref`: PASS when every
    position is within atol + rtol·|ref| and the mean KL within tol.kl, FAIL otherwise (NaN fails), INFO
    when the tolerance is not required."""
    m = compare(ref, at_positions(logits, mask), tol.atol, tol.rtol)
    row.max_abs, row.kl, row.agree = m.max_abs, m.kl, m.agree
    row.worst_ratio = m.worst_ratio if tol.required else math.nan
    row.tolerance = tol.text()
    ok = m.worst_ratio <= 1 and m.kl <= tol.kl  # NaN compares False: a NaN logit fails
    row.status = "INFO" if not tol.required else ("PASS" if ok else "FAIL")
    return row


def verify(base: Union[str, PathLike, nn.Module], adapter: Union[PathLike, AdapterFile], *,
           prompts: Optional[Sequence[str]] = None, dtypes: Sequence[str] = ("fp32", "bf16"),
           variants: Sequence[str] = ALL_VARIANTS, max_length: int = 32, tokenizer: Any = None,
           num_layers: Optional[int] = None, device: DeviceSpec = None) -> VerifyReport:
    """Compare every variant x dtype with the fp32 on-the-fly reference on the probe set (module docstring).

    `base`: a load_base spec or a bare model (copied, never changed). Probes: `prompts` tokenized with the
    base's tokenizer (default: probes.DEFAULT_PROMPTS), or seeded random ids for a base without tokenizer.
    `device`: where the reference and every variant run ('cpu', 'cuda:1', ... or a torch.device; None: where
    `base` is, the CPU for a spec); the exported directory is loaded back onto it too."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ConfigError(f"unknown variant(s) {unknown}; expected some of {list(VARIANTS)}")
    torch_dtypes = [parse_dtype(d) for d in dtypes]
    af = adapter if isinstance(adapter, AdapterFile) else read_adapter(adapter)
    model, tok = _base(base, tokenizer, num_layers, device)
    probes = make_probes(tok, prompts, vocab_size=_vocab(model), max_length=max_length)
    ctx = Context(model, tok, af, probes)
    reference = run_logits(ctx.with_adapter(torch.float32), probes).float()  # (N, T, V)
    ref = Reference.from_logits(at_positions(reference, probes.attention_mask))
    report = VerifyReport(base_name(model), str(af.path), probes=probes, reference=reference, context=ctx)
    for name in variants:
        variant = VARIANTS[name]
        for dname, dtype in zip(dtypes, torch_dtypes):
            row = Row(name, dname, "UNAVAILABLE", variant.required)
            try:
                out = variant.run(ctx, dtype)
            except Unavailable as exc:
                row.note = str(exc)
                report.rows.append(row)
                continue
            logits, row.note = out if isinstance(out, tuple) else (out, "")
            report.rows.append(judge(row, ref, logits, probes.attention_mask, tolerance_for(dtype, variant.required)))
    return report


def record_golden(adapter_dir: PathLike, base: Union[str, PathLike, nn.Module],
                  probes: Optional[Union[Probes, Sequence[str]]] = None, *, tokenizer: Any = None,
                  num_layers: Optional[int] = None, max_length: int = 32) -> dict[str, Any]:
    """Store golden logits in `adapter_dir`: the reference (bare `base` in fp32 + this directory's adapter on
    the fly) on `probes` (a Probes, a list of prompts, or None for the defaults). Returns golden.json's content.
    The adapter's own files, and so its content hash and PEFT loading, are untouched."""
    af = read_adapter(adapter_dir)
    model, tok = _base(base, tokenizer, num_layers)
    got = probes if isinstance(probes, Probes) else make_probes(tok, probes, vocab_size=_vocab(model),
                                                               max_length=max_length)
    ctx = Context(model, tok, af, got)
    return _store_golden(adapter_dir, af, model, got, run_logits(ctx.with_adapter(torch.float32), got))


def record_golden_from(report: VerifyReport, adapter_dir: PathLike) -> dict[str, Any]:
    """record_golden reusing the probes and reference a `verify` run already computed for this adapter."""
    af = read_adapter(adapter_dir)
    if report.reference is None or report.probes is None or report.context is None:
        raise ConfigError("this report holds no reference logits (it did not come from verify)")
    if report.context.adapter.content_hash != af.content_hash:
        raise ConfigError(f"the report verified adapter {report.context.adapter.content_hash[:12]}, but "
                          f"{str(adapter_dir)!r} holds {af.content_hash[:12]}")
    return _store_golden(adapter_dir, af, report.context.base, report.probes, report.reference)


def _store_golden(adapter_dir: PathLike, af: AdapterFile, base: nn.Module, probes: Probes,
                  logits: torch.Tensor) -> dict[str, Any]:
    facts = {"adapter_content_hash": af.content_hash, "base": base_name(base),
             "base_fingerprint": base_fingerprint(base), "reference": "base fp32 + adapter on the fly"}
    return write_golden(adapter_dir, probes, logits, facts)


def check_golden(deployment: Union[PathLike, nn.Module], adapter_dir: PathLike,
                 device: DeviceSpec = None) -> VerifyReport:
    """Re-run the golden probes of `adapter_dir` on `deployment` (a merged transformers directory, loaded with
    plain from_pretrained, or a model in eval mode, e.g. base + adapter) and judge it in its logits' dtype.
    `device`: where a deployment directory is loaded (None: the CPU); a model runs where it is."""
    golden = read_golden(adapter_dir)
    af = read_adapter(adapter_dir)
    if golden.facts.get("adapter_content_hash") != af.content_hash:
        raise AdapterFileError(f"the golden logits in {str(adapter_dir)!r} were recorded for adapter content "
                               f"{str(golden.facts.get('adapter_content_hash'))[:12]}, but the adapter there is now "
                               f"{af.content_hash[:12]}; record them again (verify --record-golden)")
    if isinstance(deployment, nn.Module):
        if deployment.training:
            raise ConfigError("the deployment model is in training mode (dropout on); call model.eval() first")
        model, label = deployment, f"golden vs {base_name(deployment)}"
    else:
        model, label = from_pretrained(deployment), f"golden vs {Path(deployment).name}"
        model = model if device is None else model.to(_resolve(device))
    logits = run_logits(model, golden.probes)  # (N, T, V) in the deployment's dtype
    dname = next((k for k, v in DTYPES.items() if v == logits.dtype), str(logits.dtype))
    report = VerifyReport(str(golden.facts.get("base", "?")), str(adapter_dir))
    row = judge(Row(label, dname, "FAIL", True), golden.reference, logits, golden.probes.attention_mask,
                 tolerance_for(logits.dtype))
    row.note = f"{golden.facts.get('logits')} golden, {golden.reference.values.shape[0]} positions"
    report.rows.append(row)
    return report

