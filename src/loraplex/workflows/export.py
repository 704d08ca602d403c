"""Deployment export: merge one or more adapters (with weights) into a base and write a transformers directory.

    W' = W + sum_i weight_i * scale_i * B_i @ A_i      for every targeted weight
The result loads with `AutoModelForCausalLM.from_pretrained(out)` and needs no loraplex at inference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn as nn

from .. import __version__
from ..errors import ConfigError
from ..inject import eject
from ..merge import merge
from ..outputs import PathLike, atomic_directory, check_output, write_json
from ..store import AdapterFile, load_adapter, read_adapter

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ExportReport:
    """What an export wrote: adapters (path, content hash, weight), dtype, and the merge's restore error."""

    out: str
    dtype: str
    adapters: list[dict[str, Any]] = field(default_factory=list)
    max_restore_error: float = 0.0
    loraplex_version: str = __version__


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def merge_into(model: nn.Module, adapters: Sequence[Union[PathLike, AdapterFile]],
               weights: Optional[Sequence[float]] = None, *, check_base_model: bool = True) -> ExportReport:
    """Load each adapter into `model`, merge them with `weights` (default 1 each) and unload the wrappers.
    `model` is modified in place and becomes a plain model with merged weights."""
    weights = list(weights) if weights is not None else [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise ConfigError(f"got {len(adapters)} adapters but {len(weights)} weights; give one weight per adapter")
    if not adapters:
        raise ConfigError("no adapter given to merge")
    report = ExportReport(out="", dtype="")
    for i, (src, w) in enumerate(zip(adapters, weights)):
        af = src if isinstance(src, AdapterFile) else read_adapter(src)
        name = f"merge{i}"
        load_adapter(model, af, name, check_base_model=check_base_model, activate=False)
        rec = merge(model, name, w)
        report.max_restore_error = max(report.max_restore_error, rec.max_restore_error)
        report.adapters.append({"path": str(af.path), "content_hash": af.content_hash, "weight": w})
    eject(model)  # merged deltas stay in the weights; the wrappers go
    return report


def export_merged(model: nn.Module, tokenizer: Any, adapters: Sequence[Union[PathLike, AdapterFile]],
                  out: PathLike, *, weights: Optional[Sequence[float]] = None, dtype: str = "fp32",
                  check_base_model: bool = True, overwrite: bool = False,
                  inputs: Sequence[PathLike] = ()) -> ExportReport:
    """Merge `adapters` into `model` (in place) and write a transformers model directory to `out`, atomically:
    config + safetensors weights (+ tokenizer when given) + loraplex_merge.json describing the merge.
    An existing non-empty `out` is replaced only with `overwrite`; an `out` that is or holds an adapter (or
    one of `inputs`, e.g. the base's directory) is refused, before anything is merged."""
    paths = [a.path if isinstance(a, AdapterFile) else a for a in adapters] + list(inputs)
    check_output(out, overwrite=overwrite, inputs=paths)
    report = merge_into(model, adapters, weights, check_base_model=check_base_model)
    model.to(parse_dtype(dtype))
    report.out, report.dtype = str(out), dtype
    with atomic_directory(out, overwrite=overwrite, inputs=paths) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json(Path(tmp) / "loraplex_merge.json", asdict(report))
    return report
