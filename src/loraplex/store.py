"""Adapter files in PEFT's layout: a directory with adapter_config.json + adapter_model.safetensors.

Tensor keys (adapter name removed, PEFT's `base_model.model.` prefix), e.g. for a Llama q_proj:
    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight     (r, in)
    base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight     (out, r)
    base_model.model.model.embed_tokens.lora_embedding_A               (r, vocab)
    base_model.model.lm_head.weight                                     modules_to_save copy
loraplex's own facts ride in the safetensors metadata header, which PEFT ignores:
    loraplex.version, loraplex.content_hash, loraplex.base_fingerprint (JSON).
Writes are atomic (temporary directory + rename); reads verify everything before touching the model.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import __version__
from .config import LoraConfig
from .errors import AdapterFileError, LoraplexError, NonFiniteError, ShapeMismatchError, UnsupportedFeatureError
from .identity import base_fingerprint, check_base, content_hash
from .inject import _wrappers, configs, freeze_base, inject, lora_layers, remove_adapter, set_active
from .layers import LoraEmbedding

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
PathLike = Union[str, os.PathLike]


@dataclass
class AdapterFile:
    """A verified adapter directory in memory. `tensors` keys are model-relative (prefix stripped)."""

    path: Path
    config: LoraConfig
    tensors: dict[str, torch.Tensor]
    content_hash: str
    base_fingerprint: Optional[dict[str, Any]] = None
    loraplex_version: Optional[str] = None
    raw_config: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


# -- atomic directories --------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_directory(path: PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `path`; on success it replaces `path` (old content removed
    only after the new one is in place). On error the temporary directory is deleted and `path` untouched."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(target, old)
        os.rename(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: PathLike, data: Any) -> None:
    """Write JSON atomically (temp file + os.replace)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=True, default=str)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_png(fig: Any, path: PathLike) -> Path:
    """Save a matplotlib Figure as PNG atomically (temp file + os.replace); returns the path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}.png")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


# -- model <-> PEFT state dict ------------------------------------------------------------------------------
def adapter_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The tensors of adapter `name` under PEFT's file keys (see module docstring)."""
    if name not in configs(model):
        raise LoraplexError(f"no adapter {name!r} on this model; loaded: {sorted(configs(model))}")
    config = configs(model)[name]
    out: dict[str, torch.Tensor] = {}
    for key, layer in lora_layers(model):
        if name not in layer.r:
            continue
        a, b = layer.adapter_tensors(name)
        if isinstance(layer, LoraEmbedding):
            out[f"{PREFIX}{key}.lora_embedding_A"], out[f"{PREFIX}{key}.lora_embedding_B"] = a, b
        else:
            out[f"{PREFIX}{key}.lora_A.weight"], out[f"{PREFIX}{key}.lora_B.weight"] = a, b
        if config.bias == "lora_only" and getattr(layer.base_layer, "bias", None) is not None:
            out[f"{PREFIX}{key}.base_layer.bias"] = layer.base_layer.bias
    for key, wrapper in _wrappers(model):
        if name in wrapper.modules_to_save:
            for pname, p in wrapper.modules_to_save[name].state_dict().items():
                out[f"{PREFIX}{key}.{pname}"] = p
    if config.bias == "all":
        for pname, p in model.named_parameters():
            skip = ".lora_" in pname or ".modules_to_save." in pname or ".original_module." in pname
            if pname.endswith("bias") and not skip:
                out[f"{PREFIX}{pname}"] = p
    return {k: v.detach().cpu().contiguous().clone() for k, v in out.items()}


def save_adapter(model: nn.Module, name: str, directory: PathLike, *, base_name: Optional[str] = None,
                 fingerprint: Optional[dict[str, Any]] = None) -> AdapterFile:
    """Write adapter `name` as a PEFT-readable directory, atomically. Returns what was written.
    `fingerprint`: the base fingerprint to record, taken earlier (e.g. before FSDP sharded the base weights,
    which it cannot read then); None: base_fingerprint(model)."""
    config = configs(model).get(name)
    tensors = adapter_state_dict(model, name)
    cfg = config.to_dict()
    if base_name is not None:
        cfg["base_model_name_or_path"] = base_name
    digest = content_hash(cfg, tensors)
    fingerprint = base_fingerprint(model) if fingerprint is None else fingerprint
    meta = {"format": "pt", "loraplex.version": __version__, "loraplex.content_hash": digest,
            "loraplex.base_fingerprint": json.dumps(fingerprint)}
    with atomic_directory(directory) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata=meta)
        write_json(tmp / CONFIG_NAME, cfg)
    return AdapterFile(Path(directory), config, {k[len(PREFIX):]: v for k, v in tensors.items()}, digest,
                       fingerprint, __version__, cfg)


# -- reading ------------------------------------------------------------------------------------------------
def read_adapter(directory: PathLike) -> AdapterFile:
    """Read and verify an adapter directory (config semantics, tensors finite, content hash if recorded)."""
    path = Path(directory)
    if not path.is_dir():
        raise AdapterFileError(f"adapter path {str(path)!r} is not a directory; expected a folder holding "
                               f"{CONFIG_NAME} and {WEIGHTS_NAME}")
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        raise AdapterFileError(f"{str(path)!r} has no {CONFIG_NAME}; found {sorted(p.name for p in path.iterdir())}")
    try:
        raw = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFileError(f"{cfg_file} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise AdapterFileError(f"{cfg_file} must hold a JSON object, got {type(raw).__name__}")
    config = LoraConfig.from_dict(raw)
    tensors, meta = _read_tensors(path)
    for key, t in tensors.items():
        if not key.startswith(PREFIX):
            raise AdapterFileError(f"tensor key {key!r} in {path} lacks PEFT's {PREFIX!r} prefix")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise NonFiniteError(f"adapter {str(path)!r} holds NaN/Inf in {key!r}")
    digest = content_hash(raw, tensors)
    recorded = meta.get("loraplex.content_hash")
    if recorded is not None and recorded != digest:
        raise AdapterFileError(f"adapter {str(path)!r} content hash {digest[:12]} != recorded {recorded[:12]}: "
                               "the files were modified or corrupted after saving")
    fp = meta.get("loraplex.base_fingerprint")
    return AdapterFile(path, config, {k[len(PREFIX):]: v for k, v in tensors.items()}, digest,
                       json.loads(fp) if fp else None, meta.get("loraplex.version"), raw)


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    st, legacy = path / WEIGHTS_NAME, path / LEGACY_WEIGHTS_NAME
    if st.is_file():
        try:
            with safe_open(str(st), framework="pt") as fh:
                return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})
        except (SafetensorError, OSError, ValueError) as exc:
            raise AdapterFileError(f"{st} is not a readable safetensors file: {exc}") from None
    if legacy.is_file():
        try:
            obj = torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for bad pickles; all mean "unreadable file"
            raise AdapterFileError(f"{legacy} could not be read safely (weights_only=True): {exc}") from None
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise AdapterFileError(f"{legacy} must hold a dict of tensors")
        return obj, {}
    raise AdapterFileError(f"{str(path)!r} has no {WEIGHTS_NAME} (or legacy {LEGACY_WEIGHTS_NAME})")


def load_adapter(model: nn.Module, directory: Union[PathLike, AdapterFile], name: str = "default", *,
                 check_base_model: bool = True, activate: bool = True, trainable: bool = False) -> AdapterFile:
    """Read `directory` and add it to `model` as adapter `name`. Everything is verified first; on any error
    the model is left exactly as it was. `trainable` unfreezes it for further training."""
    af = directory if isinstance(directory, AdapterFile) else read_adapter(directory)
    if check_base_model:
        check_base(af.base_fingerprint, model, f"adapter {str(af.path)!r}")
    inject(model, af.config, name, activate=False)
    try:
        _copy_in(model, name, af)
    except LoraplexError:
        remove_adapter(model, name)
        raise
    freeze_base(model, name if trainable else None)
    if activate:
        set_active(model, name)
    return af


def _copy_in(model: nn.Module, name: str, af: AdapterFile) -> None:
    expected: dict[str, tuple[torch.Tensor, str]] = {}
    for key, layer in lora_layers(model):
        if name in layer.r:
            a, b = layer.adapter_tensors(name)
            ka, kb = ((f"{key}.lora_embedding_A", f"{key}.lora_embedding_B") if isinstance(layer, LoraEmbedding)
                      else (f"{key}.lora_A.weight", f"{key}.lora_B.weight"))
            expected[ka], expected[kb] = (a, "lora"), (b, "lora")
    for key, wrapper in _wrappers(model):
        if name in wrapper.modules_to_save:
            for pname, p in wrapper.modules_to_save[name].named_parameters():
                expected[f"{key}.{pname}"] = (p, "copy")
    base_params = dict(model.named_parameters())
    missing = [k for k, (_, kind) in expected.items() if kind == "lora" and k not in af.tensors]
    if missing:
        raise AdapterFileError(f"adapter {str(af.path)!r} lacks tensors for {len(missing)} targeted module(s), "
                               f"e.g. {missing[:3]}; the config targets modules the file has no weights for")
    plan: list[tuple[torch.Tensor, torch.Tensor]] = []  # (destination, source), applied only if all fit
    for key, t in af.tensors.items():
        if key in expected:
            dest = expected[key][0]
        elif key.endswith("bias") and key in base_params:
            dest = base_params[key]
        elif key.endswith(".base_layer.weight") and key in base_params:
            if not torch.allclose(base_params[key].float(), t.float(), atol=1e-6, rtol=1e-5):
                raise UnsupportedFeatureError(f"adapter carries a full {key!r} that differs from the base's "
                                              "(a resized vocabulary?); loraplex will not overwrite base weights")
            continue
        else:
            raise AdapterFileError(f"adapter tensor {key!r} matches no module targeted by its config in this base")
        if tuple(dest.shape) != tuple(t.shape):
            raise ShapeMismatchError(f"adapter tensor {key!r} has shape {tuple(t.shape)}, the base needs "
                                     f"{tuple(dest.shape)} (adapter made for another model, or wrong rank_pattern?)")
        plan.append((dest, t))
    with torch.no_grad():
        for dest, t in plan:
            dest.copy_(t.to(dest.dtype))
