"""Parameter reports: what an adapter trains, stores, and costs at inference, kept separate vs merged.

The arithmetic of one weight W (out x in) with a rank-r adapter:
    full fine-tuning trains        out*in                    (4096x4096: 16,777,216)
    LoRA trains                    r*in + out*r              (r=8: 65,536)
    inference, kept separate uses  out*in + r*in + out*r     (W + A + B: 16,842,752)
    inference, merged uses         out*in                    (W' = W + s*B@A only)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch.nn as nn

from .inject import configs, lora_layers


@dataclass(frozen=True)
class WeightArithmetic:
    """Parameter counts for one (out x in) weight with a rank-r adapter (see module docstring)."""

    out_features: int
    in_features: int
    r: int

    @property
    def full_finetune_trainable(self) -> int:
        return self.out_features * self.in_features

    @property
    def lora_trainable(self) -> int:
        return self.r * self.in_features + self.out_features * self.r

    @property
    def inference_separate(self) -> int:
        return self.full_finetune_trainable + self.lora_trainable

    @property
    def inference_merged(self) -> int:
        return self.full_finetune_trainable


@dataclass
class ModuleRow:
    """One LoRA-wrapped module: its base size and what each adapter adds."""

    name: str
    kind: str
    base_params: int
    adapters: dict[str, int]  # adapter name -> A+B parameter count
    ranks: dict[str, int]


@dataclass
class ParameterReport:
    """Counts over a whole model with adapters. Bytes are the adapter tensors' storage (what a save writes,
    before the few-hundred-byte file header)."""

    trainable: int
    frozen: int
    modules: list[ModuleRow] = field(default_factory=list)
    adapter_params: dict[str, int] = field(default_factory=dict)  # incl. modules_to_save copies
    adapter_bytes: dict[str, int] = field(default_factory=dict)
    targeted_base_params: int = 0

    @property
    def total(self) -> int:
        return self.trainable + self.frozen

    def inference_params(self, adapter: str) -> dict[str, int]:
        """Parameters read at inference with `adapter`: kept separate (W + A + B) vs merged (W' only)."""
        base = self.total - sum(self.adapter_params.values())
        return {"separate": base + self.adapter_params[adapter], "merged": base}

    def table(self, per_module: bool = True) -> str:
        lines = []
        if per_module and self.modules:
            names = sorted({a for m in self.modules for a in m.adapters})
            rows = [[m.name, m.kind, f"{m.base_params:,}"] + [
                f"{m.adapters[a]:,} (r={m.ranks[a]})" if a in m.adapters else "-" for a in names] for m in self.modules]
            lines.append(format_table(rows, ["module", "type", "base params"] + names))
            lines.append("")
        summary = [["trainable", f"{self.trainable:,}", f"{100 * self.trainable / max(self.total, 1):.4f}%"],
                   ["frozen", f"{self.frozen:,}", f"{100 * self.frozen / max(self.total, 1):.4f}%"],
                   ["total", f"{self.total:,}", "100%"]]
        lines.append(format_table(summary, ["parameters", "count", "share"]))
        if self.adapter_params:
            rows = []
            for a in sorted(self.adapter_params):
                inf = self.inference_params(a)
                rows.append([a, f"{self.adapter_params[a]:,}", human_bytes(self.adapter_bytes[a]),
                             f"{inf['separate']:,}", f"{inf['merged']:,}"])
            lines.append("")
            lines.append(format_table(rows, ["adapter", "params", "bytes", "inference: W+A+B", "inference: merged W'"]))
        return "\n".join(lines)


def parameter_report(model: nn.Module) -> ParameterReport:
    """Count trainable/frozen parameters, per LoRA module and per adapter."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    report = ParameterReport(trainable=trainable, frozen=frozen)
    for name in configs(model):
        report.adapter_params[name] = 0
        report.adapter_bytes[name] = 0
    for key, layer in lora_layers(model):
        base_params = sum(p.numel() for p in layer.base_layer.parameters())
        row = ModuleRow(key, type(layer.base_layer).__name__, base_params, {}, {})
        report.targeted_base_params += base_params
        for a in layer.r:
            tensors = layer.adapter_params(a)  # A, B (+ DoRA's magnitude)
            row.adapters[a] = sum(t.numel() for t in tensors)
            row.ranks[a] = layer.r[a]
            report.adapter_params[a] = report.adapter_params.get(a, 0) + row.adapters[a]
            report.adapter_bytes[a] = report.adapter_bytes.get(a, 0) + sum(t.numel() * t.element_size() for t in tensors)
        report.modules.append(row)
    for _, module in model.named_modules():
        copies = getattr(module, "modules_to_save", None)
        if isinstance(copies, nn.ModuleDict):
            for a, clone in copies.items():
                ps = list(clone.parameters())
                report.adapter_params[a] = report.adapter_params.get(a, 0) + sum(p.numel() for p in ps)
                report.adapter_bytes[a] = report.adapter_bytes.get(a, 0) + sum(p.numel() * p.element_size() for p in ps)
    return report


def format_table(rows: Sequence[Sequence[Any]], headers: Sequence[str], align: Optional[str] = None) -> str:
    """A plain-text table with a header rule; numbers right-aligned unless `align` gives 'l'/'r' per column."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    if align is None:
        align = "".join("r" if rows and all(_numeric(str(r[i])) for r in rows) else "l" for i in range(len(headers)))

    def fmt(r: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(r, widths, align)).rstrip()

    return "\n".join([fmt(cells[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in cells[1:]])


def _numeric(s: str) -> bool:
    t = s.replace(",", "").replace("%", "").replace("x", "").strip()
    try:
        float(t)
        return True
    except ValueError:
        return s in ("-", "")


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n /= 1024
        i += 1
    return f"{n:,.0f} B" if i == 0 else f"{n:,.1f} {units[i]}"
