"""EVA (Explained Variance Adaptation, PEFT's init_lora_weights="eva"): a data-driven start for a new adapter.

For every targeted linear layer, the inputs x (tokens, in) it sees over batches of training data feed an
incremental PCA (ipca.py); lora_A starts at the top right-singular vectors of those activations and lora_B at
zero, so the model is unchanged at the start and the first updates follow the directions the data uses most:
    A_l = V_l[:r_l]            (r_l, in)   (with whiten: V_l[:r_l] / sqrt(S_l[:r_l])[:, None])
    B_l = 0                    (out, r_l)
The ranks are redistributed (rho >= 1): each layer may take up to round(r * rho) components, and the budget
sum_l r_l (the ranks the config gives) goes to the components of largest explained-variance ratio over all
layers. A layer left with r_l = 0 gets no adapter; with adjust_scaling_factors, alpha_l = alpha * r_l / r so the
scale alpha_l / r_l stays alpha / r. Batches repeat until, for every layer, the cosine similarity of each of its
first r_l components between two consecutive updates is >= tau. Tokens count where attention_mask is 1 and,
with use_label_mask, the label is not label_mask_value. Layers that receive the same input (q/k/v) share one
PCA. All of this is PEFT 0.21.2's `get_eva_state_dict` / `initialize_lora_eva_weights`, step for step, except
that `whiten` divides each layer's rows once (PEFT divides the shared rows in place once per layer of a group).

    from loraplex.train.eva import EvaConfig, inject_eva
    config = lp.LoraConfig(r=8, target_modules="all-linear", init_lora_weights="eva")
    inject_eva(model, config, batches, "a", eva_config=EvaConfig(rho=2.0))   # batches: dicts for model(**batch)

The adapter is then a plain LoRA: saved with per-module rank_pattern / alpha_pattern, the targets that kept a
rank, and init_lora_weights=true (PEFT's own file says "eva"; both load anywhere as plain LoRA).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn

from ..config import LoraConfig
from ..errors import ConfigError, DataError, UnsupportedFeatureError
from ..inject import disable_adapters, find_targets, inject, lora_layers
from ..layers import LoraLayer
from ..functional import Conv1D
from .ipca import IncrementalPCA

RHO_CEILING = 1000  # PEFT: a rho above this is capped at (largest parameter dimension) // r
MAX_BATCHES = 1000  # forward passes before an unconverged EVA stops with DataError (PEFT has no bound)
Batch = Mapping[str, torch.Tensor]
ForwardFn = Callable[[nn.Module, Batch], Any]


@dataclass(frozen=True)
class EvaConfig:
    """PEFT's EvaConfig: rho (>= 1) how far ranks may move between layers (max r_l = round(r * rho)); tau in
    [0, 1] the cosine similarity at which a component counts as converged; use_label_mask / label_mask_value:
    skip tokens whose label equals it; whiten: divide A's rows by sqrt(singular value); adjust_scaling_factors:
    alpha_l = alpha * r_l / r so each layer keeps the scale alpha / r."""

    rho: float = 2.0
    tau: float = 0.99
    use_label_mask: bool = True
    label_mask_value: int = -100
    whiten: bool = False
    adjust_scaling_factors: bool = True

    def __post_init__(self) -> None:
        for name in ("rho", "tau"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"EvaConfig.{name}: expected a finite number, got {v!r}")
        if self.rho < 1.0:
            raise ConfigError(f"EvaConfig.rho: expected a number >= 1 (1: no rank redistribution), got {self.rho!r}")
        if not 0.0 <= self.tau <= 1.0:
            raise ConfigError(f"EvaConfig.tau: expected a cosine-similarity threshold in [0, 1], got {self.tau!r}")
        for name in ("use_label_mask", "whiten", "adjust_scaling_factors"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"EvaConfig.{name}: expected true or false, got {getattr(self, name)!r}")
        if isinstance(self.label_mask_value, bool) or not isinstance(self.label_mask_value, int):
            raise ConfigError(f"EvaConfig.label_mask_value: expected an int (e.g. -100), got {self.label_mask_value!r}")


def forward_dict(model: nn.Module, batch: Batch) -> Any:
    """The default forward: model(**batch) (PEFT's forward_fn_dict)."""
    return model(**batch)


class _SvdHook:
    """A forward hook folding a layer's (masked) inputs into an IncrementalPCA and tracking convergence."""

    def __init__(self, n_components: int, tau: float, tokens: "_Tokens") -> None:
        self.pca = IncrementalPCA(n_components)
        self.tau, self.tokens = tau, tokens
        self.converged = torch.zeros(n_components, dtype=torch.bool)  # (k,)

    @torch.no_grad()
    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        x = self.tokens.select(args[0])  # (tokens, in)
        if x.shape[0] < self.pca.n_components:
            return  # too few tokens in this batch for an update (PEFT skips it too)
        previous = None if self.pca.components is None else self.pca.components.clone()
        self.pca.partial_fit(x)
        if previous is not None:
            self.converged = nn.functional.cosine_similarity(self.pca.components, previous) >= self.tau


class _Tokens:
    """The positions of the current batch that count: attention_mask (all when absent) and, with the label mask,
    labels != label_mask_value; `select` takes them from a layer input (B, T, in) -> (tokens, in)."""

    def __init__(self, eva: EvaConfig) -> None:
        self.eva = eva
        self.index: Optional[torch.Tensor] = None  # (tokens, 2) of (row, position)

    def set_batch(self, batch: Batch) -> None:
        ids = batch["input_ids"]
        mask = batch.get("attention_mask", torch.ones_like(ids)).bool()
        if self.eva.use_label_mask and "labels" in batch:
            mask = mask & (batch["labels"] != self.eva.label_mask_value)
        self.index = mask.nonzero()

    def select(self, x: torch.Tensor) -> torch.Tensor:
        return x[self.index.T.unbind()]


def _digest(x: torch.Tensor) -> str:
    """A byte-exact digest of a tensor (equal inputs of two layers have equal digests)."""
    raw = x.detach().contiguous().cpu()
    return hashlib.sha256(raw.view(torch.uint8).numpy().tobytes()).hexdigest() + str(tuple(raw.shape))


def _check_module(key: str, module: nn.Module) -> None:
    from ..quant.linear import QuantLinear  # lazy: loraplex.quant imports the core

    base = module.base_layer if isinstance(module, LoraLayer) else module
    if not isinstance(base, (nn.Linear, QuantLinear)) and not (Conv1D is not None and isinstance(base, Conv1D)):
        raise UnsupportedFeatureError(
            f"init_lora_weights='eva' reads the inputs of linear layers; target {key!r} is a "
            f"{type(base).__name__} (PEFT leaves embeddings and convolutions at init_lora_weights=true): exclude it "
            "(exclude_modules) or target linear layers only")


def _to(batch: Batch, device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def get_eva_state_dict(model: nn.Module, dataloader: Iterable[Batch], config: LoraConfig,
                       eva_config: Optional[EvaConfig] = None, *, forward_fn: ForwardFn = forward_dict,
                       max_batches: int = MAX_BATCHES) -> dict[str, torch.Tensor]:
    """{targeted module name: A (r_l, in)} for the layers `config` targets in `model` (layers with r_l = 0 are
    absent), from the base's activations over `dataloader` (re-iterated until converged; any adapters already on
    the model are disabled meanwhile). `dataloader` needs a len and yields dicts holding input_ids (B, T) and
    optionally attention_mask and labels, passed to `forward_fn(model, batch)`. See the module docstring."""
    eva = eva_config or EvaConfig()
    if isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1:
        raise ConfigError(f"EVA: max_batches must be an int >= 1, got {max_batches!r}")
    if len(dataloader) == 0:  # type: ignore[arg-type]
        raise DataError("EVA: the dataloader is empty; it needs batches of the training data")
    rho = eva.rho
    if rho > RHO_CEILING:
        rho = min(rho, max(max(p.shape) for p in model.parameters()) // config.r)
    modules = dict(model.named_modules())
    targets = find_targets(model, config)
    for key in targets:
        _check_module(key, modules[key])
    device = next(model.parameters()).device
    max_components = {k: round(config.rank_for(k) * rho) for k in targets}
    budget = sum(config.rank_for(k) for k in targets)
    for key in targets:
        width = next(iter(_features(modules[key])))
        if max_components[key] > width:
            raise ConfigError(f"EVA: layer {key!r} may take round(r * rho) = {max_components[key]} components but its "
                              f"input has only {width} features: lower r (or rank_pattern) or rho")
    tokens = _Tokens(eva)
    training = model.training
    model.eval()
    try:
        with disable_adapters(model):
            equal = _equal_inputs(model, modules, targets, next(iter(dataloader)), device, tokens, forward_fn)
            for names in _groups(equal, targets):
                top = max(max_components[n] for n in names)
                max_components.update({n: top for n in names})
            hooks = {k: _SvdHook(max_components[k], eva.tau, tokens) for k in targets if k not in equal}
            layer_hook = {**{k: k for k in hooks}, **equal}  # every target -> the layer whose PCA it reads
            ranks = _fit(model, modules, dataloader, hooks, layer_hook, equal, max_components, budget, device, tokens,
                         forward_fn, max_batches)
    finally:
        model.train(training)
    out: dict[str, torch.Tensor] = {}
    for key in layer_hook:
        hook, r = hooks[layer_hook[key]], ranks[key]
        if not bool(torch.all(hook.converged[:r])):  # pragma: no cover - _fit only returns when this holds
            raise RuntimeError(f"EVA: layer {key!r} was assigned rank {r} before converging")
        if r == 0:
            continue
        a = hook.pca.components[:r]  # (r, in)
        if eva.whiten:
            a = a / hook.pca.singular_values[:r].sqrt().reshape(-1, 1)
        out[key] = a.to(device)
    return out


def _features(module: nn.Module) -> tuple[int, int]:
    base = module.base_layer if isinstance(module, LoraLayer) else module
    if Conv1D is not None and isinstance(base, Conv1D):
        return base.weight.shape[0], base.weight.shape[1]
    return base.in_features, base.out_features


def _equal_inputs(model, modules, targets, batch, device, tokens, forward_fn) -> dict[str, str]:
    """{target: the first earlier target that received byte-equal input on `batch`} (PEFT's HashHook pass)."""
    batch = _to(batch, device)
    tokens.set_batch(batch)
    digests: dict[str, str] = {}

    def hook_for(key):
        def hook(module, args, output):
            digests[key] = _digest(tokens.select(args[0]))
        return hook

    handles = [modules[k].register_forward_hook(hook_for(k)) for k in targets]
    try:
        forward_fn(model, batch)
    finally:
        for h in handles:
            h.remove()
    first: dict[str, str] = {}
    equal: dict[str, str] = {}
    for key in targets:
        if key not in digests:
            raise DataError(f"EVA: target {key!r} was not called by forward_fn on the first batch, so its inputs are "
                            "unknown: target layers the forward pass uses")
        if digests[key] in first:
            equal[key] = first[digests[key]]
        else:
            first[digests[key]] = key
    return equal


def _groups(equal: dict[str, str], targets: list[str]) -> list[list[str]]:
    """Targets sharing one input, as lists (first member first)."""
    groups: dict[str, list[str]] = {}
    for key in targets:
        lead = equal.get(key, key)
        groups.setdefault(lead, []).append(key)
    return [g for g in groups.values() if len(g) > 1]


def _fit(model, modules, dataloader, hooks, layer_hook, equal, max_components, budget, device, tokens,
         forward_fn, max_batches) -> dict[str, int]:
    """Run batches (cycling) through the hooked layers until every layer's first r_l components converged;
    return {target: r_l} from the last rank distribution (PEFT's loop, including its hook re-attachment)."""
    handles = {k: modules[k].register_forward_hook(h) for k, h in hooks.items()}
    done = {k: False for k in hooks}
    ranks = dict(max_components)
    passes = 0
    try:
        for batch in itertools.cycle(dataloader):
            batch = _to(batch, device)
            tokens.set_batch(batch)
            for key, hook in hooks.items():
                converged = bool(torch.all(hook.converged[: ranks[key]]))
                if not done[key] and converged and handles[key] is not None:
                    handles[key].remove()
                    handles[key] = None
                    done[key] = True
                elif done[key] and not converged:
                    handles[key] = modules[key].register_forward_hook(hook)
                    done[key] = False
            if all(done.values()):
                return ranks
            if passes == max_batches:
                left = [k for k, d in done.items() if not d]
                raise DataError(f"EVA: {len(left)} layer(s) (e.g. {left[0]!r}) did not converge within {max_batches} "
                                f"batches at tau={hooks[left[0]].tau}: lower tau (PEFT's default is 0.99), raise "
                                "max_batches (--eva-max-batches) or give more varied data")
            forward_fn(model, batch)
            passes += 1
            if all(h.pca.components is not None for h in hooks.values()):
                ranks = _distribute(hooks, layer_hook, equal, budget, max_components)
    finally:
        for h in handles.values():
            if h is not None:
                h.remove()
    raise DataError("EVA: the dataloader yielded no batch")  # pragma: no cover - len(dataloader) > 0 was checked


def _distribute(hooks, layer_hook, equal, budget, max_components) -> dict[str, int]:
    """The `budget` largest explained-variance ratios over all layers (each layer listing its PCA's first
    max_components), counted per layer; a layer sharing another's input never ranks above it (PEFT's swap)."""
    ratios = {k: h.pca.explained_variance_ratio[: max_components[k]] for k, h in hooks.items()}
    keys, values = zip(*[(k, c) for k, lead in layer_hook.items() for c in ratios[lead]])
    order = torch.stack(values).argsort(descending=True)
    counts = Counter([keys[i] for i in order[:budget]])
    ranks = {k: counts.get(k, 0) for k in layer_hook}
    for k, lead in equal.items():
        if ranks[lead] < ranks[k]:
            ranks[lead], ranks[k] = ranks[k], ranks[lead]
    return ranks


def eva_lora_config(config: LoraConfig, ranks: Mapping[str, int], eva_config: Optional[EvaConfig] = None
                    ) -> LoraConfig:
    """The plain-LoRA config of an EVA adapter with per-layer ranks `ranks` ({module: r_l}, r_l > 0): targets
    exactly those modules, rank_pattern / alpha_pattern by full module name where they differ from r / lora_alpha
    (alpha_l = alpha * r_l / r with adjust_scaling_factors), init_lora_weights=true."""
    eva = eva_config or EvaConfig()
    rank_pattern, alpha_pattern = {}, {}
    for key, r_l in ranks.items():
        r, alpha = config.rank_for(key), config.alpha_for(key)
        if eva.adjust_scaling_factors and r_l != r:
            alpha *= r_l / r
        if r_l != config.r:
            rank_pattern[key] = r_l
        if alpha != config.lora_alpha:
            alpha_pattern[key] = alpha
    return dataclasses.replace(config, target_modules=list(ranks), rank_pattern=rank_pattern,
                               alpha_pattern=alpha_pattern, init_lora_weights=True)


@torch.no_grad()
def inject_eva(model: nn.Module, config: LoraConfig, dataloader: Optional[Iterable[Batch]] = None,
               name: str = "default", *, eva_config: Optional[EvaConfig] = None,
               eva_state_dict: Optional[Mapping[str, torch.Tensor]] = None, forward_fn: ForwardFn = forward_dict,
               activate: bool = True, max_batches: int = MAX_BATCHES) -> list[str]:
    """Add adapter `name` to `model` with EVA (PEFT's get_peft_model + initialize_lora_eva_weights in one call):
    `config.init_lora_weights` must be "eva"; A comes from `eva_state_dict` (as `get_eva_state_dict` returns it)
    or is computed from `dataloader`; B = 0. Returns the targeted modules (those with r_l > 0); the adapter's
    config (`eva_lora_config`) is what `save_adapter` writes."""
    if config.init_lora_weights != "eva":
        raise ConfigError(f"inject_eva: expected a LoraConfig with init_lora_weights='eva', got "
                          f"{config.init_lora_weights!r}; use loraplex.inject for other inits")
    for what, bad in (("use_dora", config.use_dora), ("lora_bias", config.lora_bias)):
        if bad:
            raise UnsupportedFeatureError(f"init_lora_weights='eva' with {what}=true is not implemented by loraplex; "
                                          f"drop {what} or use another init")
    if eva_state_dict is None:
        if dataloader is None:
            raise ConfigError("inject_eva: pass a dataloader (batches of training data) or an eva_state_dict")
        eva_state_dict = get_eva_state_dict(model, dataloader, config, eva_config, forward_fn=forward_fn,
                                            max_batches=max_batches)
    elif dataloader is not None:
        raise ConfigError("inject_eva: pass a dataloader or an eva_state_dict, not both (the state dict would win)")
    if not eva_state_dict:
        raise ConfigError("inject_eva: the eva_state_dict is empty (every layer got rank 0)")
    modules = dict(model.named_modules())
    targets = set(find_targets(model, config))
    for key, a in eva_state_dict.items():
        if key not in targets:
            raise ConfigError(f"inject_eva: eva_state_dict names {key!r}, which the config does not target")
        width = _features(modules[key])[0]
        if a.dim() != 2 or a.shape[1] != width or a.shape[0] < 1:
            raise ConfigError(f"inject_eva: eva_state_dict[{key!r}] has shape {tuple(a.shape)}; the layer needs "
                              f"(r_l, in) with r_l >= 1 and in = {width}")
    resolved = eva_lora_config(config, {k: int(a.shape[0]) for k, a in eva_state_dict.items()}, eva_config)
    injected = inject(model, resolved, name, activate=activate)
    layers = dict(lora_layers(model))
    for key in injected:
        a, b = layers[key].adapter_tensors(name)
        a.copy_(eva_state_dict[key])
        b.zero_()
    return injected
