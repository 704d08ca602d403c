"""Put named LoRA adapters into any torch model, choose which run, take them out again.

`inject(model, config, name)` mutates `model` in place (documented, explicit): every module whose name matches
the config is replaced by a LoRA wrapper around it (see layers.py), the base is frozen, and only the new
adapter's tensors (plus modules_to_save and the biases `config.bias` asks for) are trainable.
The configs of the adapters on a model live in `model.loraplex_configs` ({name: LoraConfig}).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Optional, Union

import torch
import torch.nn as nn

from .config import ALL_LINEAR, FRESH_INIT_MODES, RESIDUAL_INITS, LoraConfig, is_fresh_init
from .errors import (AdapterExistsError, AdapterNotFoundError, ConfigError, MergeStateError, TargetNotFoundError,
                     UnsupportedFeatureError)
from .functional import Conv1D
from .layers import LoraLayer, ModulesToSave, lora_layer_for

_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")  # fullmatch: no trailing newline
ActiveSpec = Union[str, Sequence[str], Mapping[str, float]]


def configs(model: nn.Module) -> dict[str, LoraConfig]:
    """{adapter name: LoraConfig} of the adapters injected into `model` (empty if none)."""
    return model.__dict__.setdefault("loraplex_configs", {})


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """(module name, wrapper) for every LoRA wrapper in `model`."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def modules_to_save_wrappers(model: nn.Module) -> Iterator[tuple[str, ModulesToSave]]:
    """(module name, wrapper) for every modules_to_save wrapper in `model`."""
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSave):
            yield name, module


def is_adapter_name(name: object) -> bool:
    """True when `name` is a valid adapter name: 1-64 characters of [A-Za-z0-9_-]."""
    return isinstance(name, str) and _NAME_RE.fullmatch(name) is not None


def check_name(name: str) -> str:
    """Adapter names are 1-64 characters of [A-Za-z0-9_-] (they become module keys and file names)."""
    if not is_adapter_name(name):
        raise ConfigError(f"adapter name must match {_NAME_RE.pattern}, got {name!r}")
    return name


# -- target matching -----------------------------------------------------------------------------------------
def _candidates(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Modules a config may target: base modules, or existing LoRA wrappers (by their own name), never the
    internals of a wrapper."""
    skip: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p) for p in skip):
            continue
        if isinstance(module, (LoraLayer, ModulesToSave)):
            skip.append(name + ".")
        yield name, module


def _is_linear(module: nn.Module) -> bool:
    from .quant.linear import QuantLinear  # lazy: loraplex.quant imports store, which imports this module

    base = module.base_layer if isinstance(module, LoraLayer) else module
    return isinstance(base, (nn.Linear, QuantLinear)) or (Conv1D is not None and isinstance(base, Conv1D))


def _layer_index(key: str, layers_pattern: Union[str, list[str], None]) -> Optional[int]:
    """The first numbered segment of `key` (after one of `layers_pattern`, a name or a list of them, if given)."""
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(\d+)\.", key)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        m = next((mm for p in patterns if (mm := re.match(rf"(?:^|.*?\.){p}\.(\d+)\.", key))), None)
    return int(m.group(1)) if m else None


def _ends_with(key: str, names: Sequence[str]) -> bool:
    return any(key == n or key.endswith("." + n) for n in names)


def matches(config: LoraConfig, key: str, model: Optional[nn.Module] = None, module: Optional[nn.Module] = None,
            output_head: Optional[str] = None) -> bool:
    """Does module name `key` get LoRA under `config`? (PEFT's rules: exclude first, regex = fullmatch,
    list = exact name or dotted suffix, then layers_to_transform.)"""
    ex = config.exclude_modules
    if ex and (re.fullmatch(ex, key) if isinstance(ex, str) else _ends_with(key, ex)):
        return False
    if config.modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in config.modules_to_save):
        return False
    tm = config.target_modules
    if isinstance(tm, str):
        if tm.lower() == ALL_LINEAR:
            return module is not None and _is_linear(module) and key != output_head
        return re.fullmatch(tm, key) is not None
    if not _ends_with(key, tm):
        return False
    if config.layers_to_transform is None or config.layers_to_transform == []:  # PEFT: [] = every layer
        return True
    idx = _layer_index(key, config.layers_pattern)
    ltt = config.layers_to_transform
    return idx is not None and (idx == ltt if isinstance(ltt, int) else idx in ltt)


def _output_head(model: nn.Module) -> Optional[str]:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return None
    return next((n for n, m in model.named_modules() if m is head or getattr(m, "base_layer", None) is head), None)


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Names of the modules `config` targets in `model`; raises TargetNotFoundError if a target matches nothing."""
    head = _output_head(model)
    candidates = list(_candidates(model))
    found = [k for k, m in candidates if matches(config, k, model, m, head)]
    if not found:
        sample = [k for k, _ in candidates][:12]
        raise TargetNotFoundError(
            f"target_modules={config.target_modules!r} matches no module of {type(model).__name__}; "
            f"module names look like {sample}"
        )
    if isinstance(config.target_modules, list):
        missing = [t for t in config.target_modules if not any(_ends_with(k, [t]) for k, _ in candidates)]
        if missing:
            raise TargetNotFoundError(
                f"target module(s) {missing} not found in {type(model).__name__} (other targets matched {len(found)} "
                f"modules); module names look like {[k for k, _ in candidates][:12]}"
            )
    return found


# -- inject / eject -----------------------------------------------------------------------------------------
def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def inject(model: nn.Module, config: LoraConfig, name: str = "default", *, seed: Optional[int] = None,
           activate: bool = True, initialize: bool = True) -> list[str]:
    """Add adapter `name` to every module `config` targets; returns the targeted module names.

    The whole base is frozen; the new adapter's A/B, its modules_to_save copies and the biases selected by
    `config.bias` train. With `activate` the new adapter becomes the only active one. New wrappers take the
    train/eval mode of the module they wrap. `initialize=False` leaves A/B uninitialized for the caller to fill
    (store.load_adapter does), so any init_lora_weights of a saved file is accepted; a new adapter needs one
    of FRESH_INIT_MODES or RESIDUAL_INITS. A residual init (PiSSA, OLoRA) also rewrites the targeted base weights
    to the residual W - scale * B0 @ A0 (layers.py), alone on those modules; `remove_adapter` puts W back.
    """
    check_name(name)
    if config.trainable_token_indices is not None:
        raise UnsupportedFeatureError(
            f"trainable_token_indices={config.trainable_token_indices!r}: loraplex does not put trainable tokens on "
            "a model of its own (training, load_adapter); serve such an adapter with loraplex.runtime.MultiLoraModel "
            "or `loraplex serve`, or drop trainable_token_indices"
        )
    if name in configs(model):
        raise AdapterExistsError(f"adapter {name!r} already exists on this model; remove it or pick another name")
    if initialize and not is_fresh_init(config.init_lora_weights):
        raise UnsupportedFeatureError(
            f"init_lora_weights={config.init_lora_weights!r} is read from saved adapters, but loraplex cannot "
            f"initialize a new adapter that way; use one of {FRESH_INIT_MODES} or {RESIDUAL_INITS} ('eva' needs "
            "training data: loraplex.train.eva.inject_eva)"
        )
    targets = find_targets(model, config)
    copies = modules_to_save_targets(model, config, targets)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    modules = dict(model.named_modules())
    layers = {k: modules[k] if isinstance(modules[k], LoraLayer) else lora_layer_for(modules[k]) for k in targets}
    for key, module in layers.items():  # refused inits: nothing changed yet
        module.check_new_adapter(config.init_lora_weights if initialize else None, config.rank_for(key),
                                 config.lora_bias)
    for key, module in layers.items():  # every wrapper was built above: an unsupported module changed nothing
        if module is not modules[key]:
            _replace(model, key, module)
        module.add_adapter(
            name, config.rank_for(key), config.alpha_for(key), dropout=config.lora_dropout,
            use_rslora=config.use_rslora, init=config.init_lora_weights if initialize else None, generator=generator,
            use_dora=config.use_dora, lora_bias=config.lora_bias,
        )
    for key in copies:
        wrapper = modules[key] if isinstance(modules[key], ModulesToSave) else ModulesToSave(modules[key])
        _replace(model, key, wrapper)
        wrapper.add_adapter(name)
    configs(model)[name] = config
    freeze_base(model, name)
    if activate:
        set_active(model, name)
    return targets


def modules_to_save_targets(model: nn.Module, config: LoraConfig, targets: Sequence[str]) -> list[str]:
    """Modules whose name ends with an entry of modules_to_save (PEFT's plain suffix rule: "norm" takes
    model.norm and every *_layernorm), outermost only. A module (or one inside it) that is also a LoRA
    target in `targets` is refused: it is either adapted or copied."""
    if not config.modules_to_save:
        return []
    names = [k for k, _ in _candidates(model)]
    found: list[str] = []
    for k in names:
        if any(k.endswith(m) for m in config.modules_to_save) and not any(k.startswith(f + ".") for f in found):
            found.append(k)
    missing = [m for m in config.modules_to_save if not any(k.endswith(m) for k in names)]
    if missing:
        raise TargetNotFoundError(f"modules_to_save {missing} not found in {type(model).__name__}")
    clash = [(c, t) for c in found for t in targets if t == c or t.startswith(c + ".")]
    if clash:
        raise ConfigError(f"modules_to_save={config.modules_to_save!r} selects {clash[0][0]!r}, and target_modules="
                          f"{config.target_modules!r} puts LoRA on {clash[0][1]!r}; a module is either adapted or "
                          "copied, not both: narrow one of them")
    return found


def freeze_base(model: nn.Module, trainable: Optional[str] = None) -> None:
    """Freeze everything, then unfreeze adapter `trainable` (its A/B, modules_to_save copies and biases per
    its config). `trainable=None` freezes all adapters too."""
    for p in model.parameters():
        p.requires_grad_(False)
    if trainable is None:
        return
    config = configs(model)[trainable]
    for _, layer in lora_layers(model):
        if trainable in layer.r:
            for t in layer.adapter_params(trainable):
                t.requires_grad_(True)
            if config.bias == "lora_only" and getattr(layer.base_layer, "bias", None) is not None:
                layer.base_layer.bias.requires_grad_(True)
    for _, wrapper in modules_to_save_wrappers(model):
        if trainable in wrapper.modules_to_save:
            for p in wrapper.modules_to_save[trainable].parameters():
                p.requires_grad_(True)
    if config.bias == "all":
        for n, p in model.named_parameters():
            if n.endswith("bias") and ".lora_" not in n:
                p.requires_grad_(True)


def remove_adapter(model: nn.Module, name: str) -> None:
    """Delete adapter `name` (it must not be merged); wrappers left with no adapter are unwrapped."""
    require_adapter(model, name)
    for key, layer in list(lora_layers(model)):
        if name in layer.r:
            layer.remove_adapter(name)
            if not layer.r:
                _replace(model, key, layer.base_layer)
    for key, wrapper in list(modules_to_save_wrappers(model)):
        if name in wrapper.modules_to_save:
            wrapper.remove_adapter(name)
            if not len(wrapper.modules_to_save):
                _replace(model, key, wrapper.original_module)
    del configs(model)[name]


def eject(model: nn.Module) -> nn.Module:
    """Remove every LoRA wrapper, putting the base modules back. Merged adapters stay in the weights
    (so eject after merge = PEFT's merge_and_unload); unmerged ones are dropped."""
    for key, layer in list(lora_layers(model)):
        _replace(model, key, layer.base_layer)
    for key, wrapper in list(modules_to_save_wrappers(model)):
        merged = wrapper.merged_name
        _replace(model, key, wrapper.modules_to_save[merged] if merged else wrapper.original_module)
    configs(model).clear()
    model.__dict__.pop("loraplex_active", None)
    return model


# -- active set ---------------------------------------------------------------------------------------------
def require_adapter(model: nn.Module, name: str) -> None:
    """Raise AdapterNotFoundError unless adapter `name` is injected into `model`."""
    if name not in configs(model):
        raise AdapterNotFoundError(f"no adapter {name!r} on this model; loaded: {sorted(configs(model))}")


def normalize_active(spec: ActiveSpec) -> list[tuple[str, float]]:
    """An active-set spec as [(name, weight), ...]: "a" -> [("a", 1.0)], ["a", "b"] -> weight 1 each,
    {"a": 0.7} -> [("a", 0.7)] (names are not checked here: see `require_adapter`)."""
    if isinstance(spec, str):
        return [(spec, 1.0)]
    if isinstance(spec, Mapping):
        return [(str(k), float(v)) for k, v in spec.items()]
    return [(str(k), 1.0) for k in spec]


def set_active(model: nn.Module, spec: ActiveSpec) -> None:
    """Choose the adapters applied on the fly: a name, a list of names (weight 1 each), or {name: weight}
    for a weighted mix, e.g. {"legal": 0.7, "tone": 0.3}. An empty list activates none."""
    active = normalize_active(spec)
    for n, _ in active:
        require_adapter(model, n)
    dora = [(n, w) for n, w in active if configs(model)[n].use_dora]
    if dora and (len(active) > 1 or dora[0][1] != 1.0):
        raise UnsupportedFeatureError(
            f"DoRA adapter {dora[0][0]!r} can be active only alone at weight 1.0, got {active}: DoRA rescales each "
            "output row by its own magnitude, so a weighted mix with it is not defined; merge-free mixes need "
            "plain LoRA adapters"
        )
    owners = [n for n, _ in active if any(n in w.modules_to_save for _, w in modules_to_save_wrappers(model))]
    if len(owners) > 1:
        raise ConfigError(f"adapters {owners} each replace whole modules (modules_to_save); activate only one of them")
    for _, layer in lora_layers(model):
        layer.active = [(n, w) for n, w in active if n in layer.r]
    for _, wrapper in modules_to_save_wrappers(model):
        wrapper.active_name = next((n for n, _ in active if n in wrapper.modules_to_save), None)
    model.__dict__["loraplex_active"] = active


def active_adapters(model: nn.Module) -> list[tuple[str, float]]:
    """The current (name, weight) list set by `set_active`."""
    return list(model.__dict__.get("loraplex_active", []))


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Run the bare base inside the block. Refuses while an adapter is merged (its delta is in the weights)."""
    merged = sorted({n for _, layer in lora_layers(model) for n in layer.merged})
    if merged:
        raise MergeStateError(f"adapters {merged} are merged into the base; unmerge them before disabling adapters")
    _refuse_residual(model, "disabling adapters")
    mods = [m for _, m in lora_layers(model)] + [w for _, w in modules_to_save_wrappers(model)]
    previous = [m.disabled for m in mods]
    for m in mods:
        m.disabled = True
    try:
        yield
    finally:
        for m, was in zip(mods, previous):
            m.disabled = was


def _refuse_residual(model: nn.Module, what: str) -> None:
    """Refuse `what` (which runs base-only rows) on a model whose base a residual init rewrote."""
    held = sorted({n for _, layer in lora_layers(model) for n in layer.residual})
    if held:
        raise UnsupportedFeatureError(
            f"adapters {held} were initialized with a residual init (PiSSA/OLoRA), which rewrote the base weights "
            f"in memory, so {what} would run the residual, not the base: save the adapter (a plain LoRA on the "
            "original base) and load it into a fresh base, or remove_adapter it first")


@contextlib.contextmanager
def route_rows(model: nn.Module, adapters: Sequence[Optional[str]]) -> Iterator[torch.Tensor]:
    """Inside the block, batch row b uses adapter `adapters[b]` (None = base only), whatever is active:
    y[b] = base(x[b]) + lora_{adapters[b]}(x[b]). Works with autograd (training several adapters in one
    batch). Yields the row index tensor (B,). Refuses merged adapters and modules_to_save owners."""
    names = list(dict.fromkeys(a for a in adapters if a is not None))
    for n in names:
        require_adapter(model, n)
    merged = sorted({n for _, layer in lora_layers(model) for n in layer.merged} & set(names))
    if merged:
        raise MergeStateError(f"adapters {merged} are merged; per-row routing needs them unmerged")
    owners = [n for n in names if any(n in w.modules_to_save for _, w in modules_to_save_wrappers(model))]
    if owners:
        raise ConfigError(f"adapters {owners} replace whole modules (modules_to_save) and cannot be routed per row")
    _refuse_residual(model, "per-row routing")
    device = next(model.parameters()).device
    idx = torch.tensor([-1 if a is None else names.index(a) for a in adapters], dtype=torch.long, device=device)
    layers = [layer for _, layer in lora_layers(model)]
    for layer in layers:
        layer.row_routing = (names, idx)
    try:
        yield idx
    finally:
        for layer in layers:
            layer.row_routing = None
