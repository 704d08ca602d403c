"""Adapter files in PEFT's layout: a directory with adapter_config.json + adapter_model.safetensors.

Tensor keys (adapter name removed, PEFT's `base_model.model.` prefix), e.g. for a Llama q_proj:
    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight     (r, in)
    base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight     (out, r)
    base_model.model.model.embed_tokens.lora_embedding_A               (r, vocab)
    base_model.model.lm_head.weight                                     modules_to_save copy
loraplex's own facts ride in the safetensors metadata header, which PEFT ignores:
    loraplex.version, loraplex.content_hash, loraplex.base_fingerprint (JSON).
Writes are atomic (temporary directory + rename) and follow one overwrite rule (check_output); reads verify
everything before touching the model.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import __version__
from .config import LoraConfig
from .errors import (AdapterFileError, LoraplexError, NonFiniteError, OutputExistsError, ShapeMismatchError,
                     UnsupportedFeatureError, WriteError)
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


# -- atomic outputs ------------------------------------------------------------------------------------------
# The one overwrite rule (docs/concepts.md, "Overwrite rules"): a path that does not exist, or an empty directory,
# is written; anything else there (a file, a non-empty directory) is replaced only with overwrite=True, and then
# atomically: the old content stays until the new one is complete. An output that is, or contains, one of the
# call's inputs is refused even with overwrite. Work happens in a hidden sibling `.NAME.tmp-<pid>-<id>` made
# with the user's umask; a writer removes such leftovers of dead processes when it starts, and every reader that
# lists adapter folders skips names starting with '.'.
def check_output(path: PathLike, *, overwrite: bool = False, inputs: Iterable[PathLike] = ()) -> Path:
    """`path` as a Path if the overwrite rule lets a writer replace it; else OutputExistsError."""
    target = Path(path)
    where = target.resolve()
    for item in inputs:
        src = Path(item).resolve()
        if src == where or where in src.parents:
            held = "is" if src == where else "contains"
            raise OutputExistsError(f"output {str(target)!r} {held} the input {str(item)!r}; inputs are never "
                                    "replaced, even with --overwrite: write the output elsewhere")
    if overwrite or not (target.exists() or target.is_symlink()):
        return target
    if target.is_dir() and not any(target.iterdir()):
        return target
    what = "a non-empty directory" if target.is_dir() else "a file"
    raise OutputExistsError(f"output {str(target)!r} already exists ({what}); pass --overwrite (overwrite=True) to "
                            "replace it, or choose another path")


@contextlib.contextmanager
def atomic_directory(path: PathLike, *, overwrite: bool = False, inputs: Iterable[PathLike] = ()) -> Iterator[Path]:
    """Yield a fresh hidden directory beside `path`; on success it takes `path`'s place (the old content, allowed
    by the overwrite rule above, is removed only after the new one is in place). On error the temporary
    directory is deleted and `path` untouched; an OSError (disk full, read-only) becomes WriteError."""
    inputs = list(inputs)
    target = check_output(path, overwrite=overwrite, inputs=inputs)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _clean_stale(target)
        tmp = _temp_sibling(target)
        os.mkdir(tmp)  # mode 0o777 & ~umask, like any folder the user makes (mkdtemp would give 0o700)
    except OSError as exc:
        raise _write_error(target, exc) from exc
    old = None
    try:
        yield tmp
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        check_output(target, overwrite=overwrite, inputs=inputs)  # again: something may have appeared meanwhile
        if target.exists() or target.is_symlink():
            old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(target, old)
        os.rename(tmp, target)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and old is not None and not (target.exists() or target.is_symlink()):
            os.rename(old, target)  # the second rename failed: put the old content back
        if isinstance(exc, OSError) and not isinstance(exc, LoraplexError):
            raise _write_error(target, exc) from exc
        raise
    if old is not None:
        _remove(old)


@contextlib.contextmanager
def atomic_file(path: PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a hidden temporary path beside file `path` to write; on success it replaces `path` (os.replace)
    under the overwrite rule above. On error the temporary file is removed and `path` untouched; an OSError
    (disk full, read-only) becomes WriteError."""
    target = Path(path)
    if target.is_dir():
        raise OutputExistsError(f"output {str(target)!r} is a directory; give a file path")
    check_output(target, overwrite=overwrite)
    tmp = _temp_sibling(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _clean_stale(target)
        yield tmp
        os.replace(tmp, target)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, LoraplexError):
            raise _write_error(target, exc) from exc
        raise


def _temp_sibling(target: Path) -> Path:
    return target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _clean_stale(target: Path) -> None:
    """Remove `.NAME.tmp-<pid>-*` siblings whose process is gone (a killed writer's), and `.NAME.old-*` ones
    once NAME itself exists (a kill between atomic_directory's two renames leaves the old version there)."""
    for p in target.parent.glob(f".{glob.escape(target.name)}.tmp-*"):
        if not _writer_alive(p.name[len(target.name) + 6:]):
            _remove(p)
    if target.exists():
        for p in target.parent.glob(f".{glob.escape(target.name)}.old-*"):
            _remove(p)


def _writer_alive(suffix: str) -> bool:
    """Whether the process named by a temp suffix '<pid>-<id>' still runs (this process counts as running)."""
    pid = suffix.partition("-")[0]
    if not pid.isdigit():
        return False  # not made by this scheme (e.g. an older loraplex): nobody owns it any more
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def _write_error(target: Path, exc: OSError) -> WriteError:
    reason = f"{exc.strerror} [{errno.errorcode.get(exc.errno, exc.errno)}]" if exc.strerror else str(exc)
    return WriteError(f"cannot write {str(target)!r}: {reason}; nothing was written there (what it held before is "
                      "unchanged): free disk space or choose a writable path")


def write_json(path: PathLike, data: Any, *, overwrite: bool = False) -> Path:
    """Write JSON atomically (atomic_file; an existing file is replaced only with overwrite); returns the path."""
    with atomic_file(path, overwrite=overwrite) as tmp:
        with open(tmp, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=True, default=str)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
    return Path(path)


def write_png(fig: Any, path: PathLike, *, overwrite: bool = False) -> Path:
    """Save a matplotlib Figure as PNG atomically (atomic_file; an existing file is replaced only with
    overwrite); returns the path."""
    with atomic_file(path, overwrite=overwrite) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)


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
                 overwrite: bool = False) -> AdapterFile:
    """Write adapter `name` as a PEFT-readable directory, atomically (an existing non-empty `directory` is
    replaced only with `overwrite`). NaN/Inf weights raise NonFiniteError and nothing is written."""
    config = configs(model).get(name)
    tensors = adapter_state_dict(model, name)
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise NonFiniteError(f"adapter {name!r} holds NaN/Inf in {len(bad)} tensor(s), e.g. {bad[:2]}; nothing "
                             f"was written to {str(directory)!r}")
    cfg = config.to_dict()
    if base_name is not None:
        cfg["base_model_name_or_path"] = base_name
    digest = content_hash(cfg, tensors)
    fingerprint = base_fingerprint(model)
    meta = {"format": "pt", "loraplex.version": __version__, "loraplex.content_hash": digest,
            "loraplex.base_fingerprint": json.dumps(fingerprint)}
    with atomic_directory(directory, overwrite=overwrite) as tmp:
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
