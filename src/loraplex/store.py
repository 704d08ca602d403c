"""Adapters of a model <-> adapter files (PEFT's layout; the format itself: adapter_file.py).

`save_adapter` writes one adapter of a model (`adapter_state_dict` under PEFT's keys, the config per
`peft_config_dict`): adapter_config.json gets what PEFT's AutoPeftModel needs, task_type ("CAUSAL_LM" for a
causal LM) and base_model_name_or_path (a hub id, e.g. "HuggingFaceTB/SmolLM2-135M-Instruct" for "smollm2", or a
local path). Writes are atomic (outputs.atomic_directory) and follow one overwrite rule (outputs.check_output).
Reads verify everything before touching the model, in two steps every reader shares: `read_adapter` checks the
file alone (adapter_file.py), `validate_adapter` checks it against a base (targets present, shapes fit) before
anything is allocated; `load_adapter` then copies it in.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn as nn
from safetensors.torch import save_file

from .version import __version__
from .adapter_file import (  # noqa: F401  (the format's names stay importable from here)
    CONFIG_NAME, FACTOR_SUFFIXES, LEGACY_WEIGHTS_NAME, MAGNITUDE_SUFFIX, PREFIX, WEIGHTS_NAME, AdapterFile, LoraModule,
    factor_keys, lora_factors, lora_modules, read_adapter, unread_keys,
)
from .config import LoraConfig
from .errors import (AdapterFileError, ConfigError, LoraplexError, NonFiniteError, ShapeMismatchError,
                     TargetNotFoundError, UnsupportedFeatureError, UnsupportedModuleError)
from .functional import tolerance
from .identity import base_fingerprint, check_base, content_hash
from .inject import (configs, find_targets, freeze_base, inject, lora_layers, modules_to_save_targets,
                     modules_to_save_wrappers, remove_adapter, set_active)
from .layers import LoraConv, LoraEmbedding, LoraLayer, ModulesToSave, lora_layer_type
from .models import NAMES, canonical_base_id
from .outputs import PathLike, atomic_directory, write_json
from .tokens import token_rows


# -- model <-> PEFT state dict ------------------------------------------------------------------------------
def adapter_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The tensors of adapter `name` under PEFT's file keys (adapter_file.py). A residual-init adapter
    (PiSSA/OLoRA: the base holds W - scale * B0 @ A0) comes as the plain LoRA on the original base W that PEFT's
    save_pretrained(path_initial_model_for_weight_conversion=...) writes: delta = scale * (B @ A - B0 @ A0) =
    scale * B' @ A' with A' = [A; A0] (2r, in) and B' = [B, -B0] (out, 2r); see `plain_lora_config`."""
    if name not in configs(model):
        raise LoraplexError(f"no adapter {name!r} on this model; loaded: {sorted(configs(model))}")
    config = configs(model)[name]
    out: dict[str, torch.Tensor] = {}
    for key, layer in lora_layers(model):
        if name not in layer.r:
            continue
        a, b = layer.adapter_tensors(name)
        if name in layer.residual:
            a0, b0 = layer.residual[name]
            a, b = torch.cat([a, a0], dim=0), torch.cat([b, -b0], dim=1)  # (2r, in), (out, 2r)
        if isinstance(layer, LoraEmbedding):
            out[f"{PREFIX}{key}.lora_embedding_A"], out[f"{PREFIX}{key}.lora_embedding_B"] = a, b
        else:
            out[f"{PREFIX}{key}.lora_A.weight"], out[f"{PREFIX}{key}.lora_B.weight"] = a, b
        if layer.is_dora(name):
            out[f"{PREFIX}{key}.lora_magnitude_vector"] = layer.lora_magnitude_vector[name].weight
        if layer.lora_b_bias(name) is not None:  # PEFT's lora_bias: lora_B is an nn.Linear with a bias
            out[f"{PREFIX}{key}.lora_B.bias"] = layer.lora_b_bias(name)
        if config.bias == "lora_only" and getattr(layer.base_layer, "bias", None) is not None:
            out[f"{PREFIX}{key}.base_layer.bias"] = layer.base_layer.bias
    for key, wrapper in modules_to_save_wrappers(model):
        if name in wrapper.modules_to_save:
            for pname, p in wrapper.modules_to_save[name].state_dict().items():
                out[f"{PREFIX}{key}.{pname}"] = p
    if config.bias == "all":
        for pname, p in model.named_parameters():
            skip = ".lora_" in pname or ".modules_to_save." in pname or ".original_module." in pname
            if pname.endswith("bias") and not skip:
                out[f"{PREFIX}{pname}"] = p
    return {k: v.detach().cpu().contiguous().clone() for k, v in out.items()}


def plain_lora_config(config: LoraConfig) -> LoraConfig:
    """The config a residual-init adapter is saved with (PEFT's conversion): every rank doubled and every alpha
    doubled (times sqrt(2) with rsLoRA), so the scale is unchanged; init_lora_weights=true. (PEFT doubles
    alpha_pattern values even with rsLoRA, which changes their scale; here they follow lora_alpha.)"""
    k = math.sqrt(2) if config.use_rslora else 2
    return dataclasses.replace(
        config, r=2 * config.r, lora_alpha=k * config.lora_alpha, init_lora_weights=True,
        rank_pattern={p: 2 * v for p, v in config.rank_pattern.items()},
        alpha_pattern={p: k * v for p, v in config.alpha_pattern.items()})


def saved_config(model: nn.Module, name: str) -> LoraConfig:
    """The config adapter `name` of `model` is saved with: its own, or `plain_lora_config` of it when a residual
    init rewrote the base (the tensors `adapter_state_dict` gives then have rank 2r)."""
    config = configs(model)[name]
    residual = any(name in layer.residual for _, layer in lora_layers(model))
    return plain_lora_config(config) if residual else config


def peft_config_dict(config: LoraConfig, model: nn.Module, base_name: Optional[str] = None) -> dict[str, Any]:
    """`config` as adapter_config.json for an adapter on `model`, with what PEFT's AutoPeftModel needs:
    task_type "CAUSAL_LM" when `model` is a transformers causal LM (kept if the config sets one), and
    base_model_name_or_path = `base_name`, else the config's, else the model's name_or_path, written as
    something PEFT can resolve: an existing local directory as its absolute path, "smollm2" as its hub id."""
    cfg = config.to_dict()
    base = base_name or config.base_model_name_or_path or getattr(getattr(model, "config", None), "name_or_path", None)
    if base:
        local = base not in NAMES and Path(base).is_dir()  # load_base reads a name before a same-named directory
        cfg["base_model_name_or_path"] = str(Path(base).resolve()) if local else canonical_base_id(base)
    if cfg["task_type"] is None and is_causal_lm(model):
        cfg["task_type"] = "CAUSAL_LM"
    return cfg


def is_causal_lm(model: nn.Module) -> bool:
    """Is `model` of a class transformers' AutoModelForCausalLM builds (e.g. LlamaForCausalLM, GPT2LMHeadModel)?"""
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:  # pragma: no cover - plain torch users: no transformers model can be a causal LM
        return False
    return type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def save_adapter(model: nn.Module, name: str, directory: PathLike, *, base_name: Optional[str] = None,
                 overwrite: bool = False, fingerprint: Optional[dict[str, Any]] = None) -> AdapterFile:
    """Write adapter `name` as a PEFT-readable directory (config per `peft_config_dict`), atomically (an existing
    non-empty `directory` is replaced only with `overwrite`). NaN/Inf weights raise NonFiniteError and nothing is
    written. A residual-init adapter (PiSSA/OLoRA) is written as a plain LoRA on the original base (rank 2r; see
    `adapter_state_dict`), which PEFT and loraplex load on the untouched base. Returns what was written.
    `fingerprint`: the base fingerprint to record, taken earlier (e.g. before FSDP sharded the base weights,
    which it cannot read then); None: base_fingerprint(model)."""
    tensors = adapter_state_dict(model, name)
    config = saved_config(model, name)
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise NonFiniteError(f"adapter {name!r} holds NaN/Inf in {len(bad)} tensor(s), e.g. {bad[:2]}; nothing "
                             f"was written to {str(directory)!r}")
    cfg = peft_config_dict(config, model, base_name)
    digest = content_hash(cfg, tensors)
    fingerprint = base_fingerprint(model) if fingerprint is None else fingerprint
    meta = {"format": "pt", "loraplex.version": __version__, "loraplex.content_hash": digest,
            "loraplex.base_fingerprint": json.dumps(fingerprint)}
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata=meta)
        write_json(tmp / CONFIG_NAME, cfg)
    return AdapterFile(Path(directory), config, {k[len(PREFIX):]: v for k, v in tensors.items()}, digest,
                       fingerprint, __version__, cfg)


def validate_adapter(af: AdapterFile, model: nn.Module) -> list[str]:
    """Check that `af` fits `model` before anything is allocated or changed; returns the names of the modules
    its LoRA targets on `model`. Refuses (naming the file): a target the base lacks (TargetNotFoundError) or
    cannot wrap (UnsupportedModuleError); a target without both factors (AdapterFileError); factors whose
    shapes are not what the target needs (ShapeMismatchError, e.g. A (r, in) and B (out, r) for a Linear);
    a tensor that is no targeted module's factor, no modules_to_save copy of the right shape and kind, and
    no bias its config trains (AdapterFileError). Also runs `lora_factors`."""
    what, config = f"adapter {str(af.path)!r}", af.config
    lora_factors(af)
    tokens = token_rows(af)  # fitted to the embedding by whoever serves them (runtime.embedding.token_tensors)
    try:
        targets = find_targets(model, config)
        modules = dict(model.named_modules())
        # the wrapper class and base of each target (no wrapper is built: a check needs only their shapes)
        layers = {k: (type(m), m.base_layer) if isinstance(m, LoraLayer) else (lora_layer_type(m), m)
                  for k, m in ((k, modules[k]) for k in targets)}
        copies = modules_to_save_targets(model, config, targets)
    except (TargetNotFoundError, UnsupportedModuleError, ConfigError) as exc:
        raise type(exc)(f"{what}: {exc}") from None
    expected: dict[str, torch.Tensor] = {}  # file key -> a tensor of the shape and kind it must have (meta)
    for key, (cls, base) in layers.items():
        ka, kb = factor_keys(key, issubclass(cls, LoraEmbedding))
        a_shape, b_shape = cls.shapes_for(base, config.rank_for(key))
        expected[ka], expected[kb] = torch.empty(a_shape, device="meta"), torch.empty(b_shape, device="meta")
        if config.use_dora:  # m: (out,), a conv's (1, out, 1[, 1]) as PEFT stores it
            shape = (1, b_shape[0], *b_shape[2:]) if issubclass(cls, LoraConv) else (b_shape[0],)
            expected[f"{key}.lora_magnitude_vector"] = torch.empty(shape, device="meta")
        if config.lora_bias and not issubclass(cls, LoraEmbedding):  # b (out,); inject refuses other layers
            expected[f"{key}.lora_B.bias"] = torch.empty(b_shape[0], device="meta")
    missing = [k for k in expected if k not in af.tensors]
    if missing:
        raise AdapterFileError(f"{what} lacks tensors for {len(missing)} targeted module(s), e.g. {missing[:3]}; "
                               "the config targets modules the file has no weights for")
    for key in copies:
        module = modules[key]
        original = module.original_module if isinstance(module, ModulesToSave) else module
        expected.update({f"{key}.{n}": t for n, t in original.state_dict().items()})
    wrapped = {k for k, (_, base) in layers.items() if base is modules[k]}  # parameters move under .base_layer
    params = {}
    for n, p in model.named_parameters(remove_duplicate=False):  # a tied lm_head's weight under its own name too
        owner, _, leaf = n.rpartition(".")
        params[f"{owner}.base_layer.{leaf}" if owner in wrapped else n] = p
    biases = _trained_biases(config, params, targets)
    for key, t in af.tensors.items():
        if tokens is not None and key == tokens.key:
            continue
        if key in expected or key in biases:
            dest = expected.get(key, params.get(key))
            if tuple(dest.shape) != tuple(t.shape):
                raise ShapeMismatchError(f"{what}: tensor {key!r} has shape {tuple(t.shape)}, the base needs "
                                         f"{tuple(dest.shape)} (adapter made for another model, or wrong rank_pattern?)")
            if dest.is_floating_point() != t.is_floating_point():
                raise AdapterFileError(f"{what}: tensor {key!r} holds {t.dtype} values where the base has "
                                       f"{dest.dtype} ones")
        elif key.endswith(".base_layer.weight") and key in params:
            if not torch.allclose(params[key].float(), t.float(), atol=1e-6, rtol=1e-5):
                raise UnsupportedFeatureError(f"{what} carries a full {key!r} that differs from the base's "
                                              "(a resized vocabulary?); loraplex will not overwrite base weights")
        else:
            suffix = next((sfx for sfx in FACTOR_SUFFIXES if key.endswith(sfx)), None)
            if suffix is not None and key[: -len(suffix)] not in modules:
                raise TargetNotFoundError(f"{what}: tensor {key!r} is for module {key[: -len(suffix)]!r}, which this "
                                          "base does not have (adapter made for a deeper or different model?)")
            raise AdapterFileError(f"{what}: tensor {key!r} matches no module targeted by its config in this base "
                                   f"(target_modules={config.target_modules!r}, modules_to_save="
                                   f"{config.modules_to_save!r}, bias={config.bias!r})")
    return targets


def _trained_biases(config: LoraConfig, params: dict[str, torch.Tensor], targets: list[str]) -> set[str]:
    """Names (as after injection) of the base biases an adapter with `config` trains and so carries in its file."""
    if config.bias == "lora_only":
        return {k for k in (f"{t}.base_layer.bias" for t in targets) if k in params}
    if config.bias == "all":
        return {n for n in params if n.endswith("bias")
                and not any(s in n for s in (".lora_", ".modules_to_save.", ".original_module."))}
    return set()


def load_adapter(model: nn.Module, directory: Union[PathLike, AdapterFile], name: str = "default", *,
                 check_base_model: bool = True, activate: bool = True, trainable: bool = False) -> AdapterFile:
    """Read `directory` and add it to `model` as adapter `name`. Everything is verified first (`read_adapter`,
    `validate_adapter`); on any error the model is left exactly as it was. The new wrappers take the model's
    train/eval mode. `trainable` unfreezes the adapter for further training."""
    af = directory if isinstance(directory, AdapterFile) else read_adapter(directory)
    if check_base_model:
        check_base(af.base_fingerprint, model, f"adapter {str(af.path)!r}")
    validate_adapter(af, model)
    inject(model, af.config, name, activate=False, initialize=False)
    try:
        _copy_in(model, name, af)
    except BaseException:
        remove_adapter(model, name)
        raise
    freeze_base(model, name if trainable else None)
    if activate:
        set_active(model, name)
    return af


def load_residual_state(model: nn.Module, name: str, directory: PathLike) -> AdapterFile:
    """Continue residual-init adapter `name`, just injected into `model` (same config and seed, so the same
    residual base and (A0, B0)), from the file `save_adapter` wrote for it (a training checkpoint): A = A'[:r],
    B = B'[:, :r] and the DoRA magnitude. Refuses (AdapterFileError, nothing copied) a file that is not that
    conversion of this adapter: other tensors, other shapes, or a second half other than this (A0, -B0)."""
    af = read_adapter(directory)
    todo: list[tuple[torch.Tensor, torch.Tensor]] = []
    used: set[str] = set()
    for key, layer in lora_layers(model):
        if name not in layer.residual:
            continue
        (ka, kb), (a, b), (a0, b0) = factor_keys(key, False), layer.adapter_tensors(name), layer.residual[name]
        a2, b2, r = af.tensors.get(ka), af.tensors.get(kb), a.shape[0]
        atol, rtol = tolerance(a0.dtype)
        if (a2 is None or b2 is None or a2.shape != (2 * r, a.shape[1]) or b2.shape != (b.shape[0], 2 * r)
                or not torch.allclose(a2[r:].to(a0), a0, atol=atol, rtol=rtol)
                or not torch.allclose(b2[:, r:].to(b0), -b0, atol=atol, rtol=rtol)):
            raise AdapterFileError(f"adapter {str(af.path)!r} at {key!r} is not the saved form of adapter {name!r} "
                                   f"([A; A0], [B, -B0] of rank {2 * r} with this base's residual init): made with "
                                   "another base, init, rank or seed? Resume with the original settings")
        todo += [(a, a2[:r]), (b, b2[:, :r])]
        used |= {ka, kb}
        if layer.is_dora(name):
            km, m = f"{key}.lora_magnitude_vector", layer.lora_magnitude_vector[name].weight
            if km not in af.tensors or af.tensors[km].shape != m.shape:
                raise AdapterFileError(f"adapter {str(af.path)!r} lacks {km!r} of shape {tuple(m.shape)}")
            todo.append((m, af.tensors[km]))
            used.add(km)
    extra = sorted(set(af.tensors) - used)
    if extra:
        raise AdapterFileError(f"adapter {str(af.path)!r} holds {extra[:3]}, which adapter {name!r} does not have")
    with torch.no_grad():
        for dest, t in todo:
            dest.copy_(t)
    return af


def _copy_in(model: nn.Module, name: str, af: AdapterFile) -> None:
    """Copy the (validated) tensors of `af` into adapter `name` just injected into `model`."""
    dest: dict[str, torch.Tensor] = {}
    for key, layer in lora_layers(model):
        if name in layer.r:
            dest.update(zip(factor_keys(key, isinstance(layer, LoraEmbedding)), layer.adapter_tensors(name)))
            if layer.is_dora(name):
                dest[f"{key}.lora_magnitude_vector"] = layer.lora_magnitude_vector[name].weight
            if layer.lora_b_bias(name) is not None:
                dest[f"{key}.lora_B.bias"] = layer.lora_b_bias(name)
    for key, wrapper in modules_to_save_wrappers(model):
        if name in wrapper.modules_to_save:
            dest.update({f"{key}.{n}": t for n, t in wrapper.modules_to_save[name].state_dict().items()})
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, t in af.tensors.items():
            if key in dest or not key.endswith(".base_layer.weight"):  # full base weights were checked equal
                target = dest.get(key, params.get(key))
                target.copy_(t.to(target.dtype))
