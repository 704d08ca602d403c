"""Save and load quantized models: model.safetensors + quantization.json in one directory.

    directory/
      model.safetensors     the quantized model's state_dict, e.g. for a Llama with int8:
                              "model.layers.0.self_attn.q_proj.qweight"  (64, 64) int8
                              "model.layers.0.self_attn.q_proj.scale"    (64,)   float32
                              "model.embed_tokens.weight"                (128, 64) float32   (not quantized)
      quantization.json     {"format": "loraplex-quantized", "format_version": 1, "scheme": "nf4",
                             "block_size": 64, "double_quant": true, "compute_dtype": "float32",
                             "modules": ["model.layers.0.self_attn.q_proj", ...],
                             "tied": {"lm_head.weight": "transformer.wte.weight"},
                             "loraplex_version": "0.1.0"}

"tied" lists state_dict names that share storage with an earlier name (safetensors stores each tensor
once); loading feeds the same tensor to both. The directory is written beside its target and renamed into
place (outputs.atomic_directory), so a reader never sees half of it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import QuantConfigError, QuantFileError, ShapeMismatchError, TargetNotFoundError
from ..outputs import atomic_directory
from .linear import COMPUTE_DTYPES, QuantLinear, QuantSpec

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "quantization.json"
FORMAT = "loraplex-quantized"
FORMAT_VERSION = 1
_DTYPE_NAMES = {str(d).removeprefix("torch."): d for d in COMPUTE_DTYPES}


def _version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("loraplex")
    except PackageNotFoundError:
        return None


def _spec_of(model: nn.Module) -> tuple[QuantSpec, list[str]]:
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, QuantLinear)]
    if not layers:
        raise QuantConfigError("the model holds no QuantLinear modules; quantize it first (quantize_model)")
    specs = {m.spec for _, m in layers}
    if len(specs) > 1:
        raise QuantConfigError(f"all quantized modules must share one quantization config to be saved, got {specs}")
    return specs.pop(), [name for name, _ in layers]


def _config_json(spec: QuantSpec, modules: list[str], tied: dict[str, str]) -> dict:
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "scheme": spec.scheme}
    if spec.scheme == "nf4":
        config |= {"block_size": spec.block_size, "double_quant": spec.double_quant}
    config |= {
        "compute_dtype": str(spec.compute_dtype).removeprefix("torch."),
        "modules": modules,
        "tied": tied,
        "loraplex_version": _version(),
    }
    return config


def save_quantized(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the quantized `model` to `directory` atomically; returns the path.

    An existing `directory` is replaced only when it is empty or was written by save_quantized.
    """
    spec, modules = _spec_of(model)
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    first_name: dict[tuple, str] = {}
    for name, t in model.state_dict().items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if key in first_name:
            tied[name] = first_name[key]
            continue
        first_name[key] = name
        tensors[name] = t.detach().to("cpu").contiguous()

    target = Path(directory)
    if target.exists() and not (target / CONFIG_FILE).is_file() and (target.is_file() or any(target.iterdir())):
        raise QuantFileError(
            f"{target} exists and is not a quantized-model directory; refusing to replace it "
            "(pass a new or empty directory, or one written by save_quantized)"
        )
    with atomic_directory(target, overwrite=True) as tmp:  # refused above unless it is a quantized model
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(_config_json(spec, modules, tied), indent=2) + "\n")
    return target


def read_quant_config(directory: str | os.PathLike) -> tuple[QuantSpec, dict]:
    """The QuantSpec and the raw quantization.json of a saved quantized model."""
    path = Path(directory) / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise QuantFileError(f"{path} not found; expected a directory written by save_quantized") from None
    except json.JSONDecodeError as e:
        raise QuantFileError(f"{path} is not valid JSON: {e}") from None
    if config.get("format") != FORMAT or config.get("format_version") != FORMAT_VERSION:
        raise QuantFileError(
            f"{path}: expected format {FORMAT!r} version {FORMAT_VERSION}, "
            f"got {config.get('format')!r} version {config.get('format_version')!r}"
        )
    dtype_name = config.get("compute_dtype", "float32")
    if dtype_name not in _DTYPE_NAMES:
        raise QuantConfigError(f"{path}: compute_dtype {dtype_name!r} is not one of {list(_DTYPE_NAMES)}")
    spec = QuantSpec(
        scheme=config.get("scheme"),
        block_size=config.get("block_size", 64),
        double_quant=config.get("double_quant", False),
        compute_dtype=_DTYPE_NAMES[dtype_name],
    )
    return spec, config


def _check_requested(spec: QuantSpec, path: Path, **requested: object) -> None:
    nf4_only = ("block_size", "double_quant")
    wrong = [
        f"{k}: asked {v!r}, file has {getattr(spec, k)!r}"
        for k, v in requested.items()
        if v is not None and getattr(spec, k) != v and not (k in nf4_only and spec.scheme != "nf4")
    ]
    if wrong:
        raise QuantConfigError(
            f"quantization config of {path} does not match the request ({'; '.join(wrong)}); "
            "load with the file's settings (or None to accept them) or re-quantize the model"
        )


def load_quantized(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    scheme: str | None = None,
    block_size: int | None = None,
    double_quant: bool | None = None,
    compute_dtype: torch.dtype | None = None,
    backend: str = "loraplex",
) -> nn.Module:
    """Turn a float `model` of the saved architecture into the saved quantized model, in place; returns it.

    Each module listed in quantization.json is replaced by an all-zero QuantLinear of its size, then
    every tensor is loaded from model.safetensors. Settings passed here (not None) must equal the file's.
    If anything does not fit, the model is left as it was. `backend` (quant.linear.BACKENDS) computes the
    loaded layers: every backend reads the one stored layout.
    """
    directory = Path(directory)
    spec, config = read_quant_config(directory)
    _check_requested(
        spec, directory, scheme=scheme, block_size=block_size, double_quant=double_quant, compute_dtype=compute_dtype
    )
    try:
        tensors = load_file(str(directory / WEIGHTS_FILE))
    except (FileNotFoundError, SafetensorError) as e:
        raise QuantFileError(f"cannot read {directory / WEIGHTS_FILE}: {e}") from None
    for alias, source in config.get("tied", {}).items():
        if source not in tensors:
            raise QuantFileError(f"{directory}: tied name {alias!r} points to {source!r}, which is not stored")
        tensors[alias] = tensors[source]

    replaced: dict[str, nn.Module] = {}  # name -> original module, to undo on failure
    new: dict[str, QuantLinear] = {}
    for name in config.get("modules", []):
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise TargetNotFoundError(
                f"quantized module {name!r} from {directory} does not exist in the model; "
                "load into a model of the architecture that was saved"
            ) from None
        if isinstance(module, QuantLinear):
            if module.spec != spec:
                raise QuantConfigError(f"module {name!r} is already quantized with {module.spec}, file has {spec}")
            continue
        new[name] = QuantLinear.like(module, spec, backend)  # raises UnsupportedModuleError for other types
        replaced[name] = module

    for name, layer in new.items():
        model.set_submodule(name, layer)
    try:
        _load_checked(model, tensors, directory)
    except BaseException:
        for name, module in replaced.items():
            model.set_submodule(name, module)
        raise
    return model


def _load_checked(model: nn.Module, tensors: dict[str, torch.Tensor], directory: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise QuantFileError(
            f"{directory} does not fit the model: missing {missing[:5]}{'...' * (len(missing) > 5)}, "
            f"unexpected {unexpected[:5]}{'...' * (len(unexpected) > 5)}; is it the same architecture?"
        )
    for name, want in expected.items():
        got = tensors[name]
        if tuple(got.shape) != tuple(want.shape):
            raise ShapeMismatchError(
                f"{name}: the model expects shape {tuple(want.shape)}, {directory} holds {tuple(got.shape)}"
            )
        if got.dtype != want.dtype and not (got.is_floating_point() and want.is_floating_point()):
            raise QuantFileError(f"{name}: the model expects dtype {want.dtype}, {directory} holds {got.dtype}")
    model.load_state_dict(tensors, strict=True)
