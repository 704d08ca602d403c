"""MultiLoraModel: many LoRA adapters served over ONE loaded base, a different adapter (or mix) per batch row.

    engine = MultiLoraModel(base, memory_budget_bytes=256 << 20, tokenizer=tok)
    engine.load("legal", "adapters/legal")                   # -> content hash
    logits = engine.forward(ids, mask, adapters=["legal", None, {"legal": 0.7, "tone": 0.3}])
    out = engine.generate(["Hi", "Hello"], adapters=["legal", "tone"], max_new_tokens=32)

Semantics, per wrapped layer (W the base weight) and batch row b with adapters {name_k: w_k}:
    y[b] = base(x[b]) + sum_k w_k * scale_k * (x[b] @ A_k.T) @ B_k.T          (None / {} = base only)
computed by `BatchPlan.apply_` (loraplex.runtime.ops) on the base layer's output, in place.
A DoRA adapter d (PEFT's use_dora) serves its rows as PEFT does, y[b] = g_d * (x[b] @ W.T + scale_d *
(x[b] @ A_d.T) @ B_d.T) + bias with g_d = m_d / ||W + scale_d B_d A_d||_row computed once at load
(loraplex.runtime.rescale); it is served alone per row (a mix including it is refused) and never merged.
A lora_bias adapter adds w * scale * b per row (loraplex.runtime.rowbias; merged: into the base biases); an
adapter holding modules_to_save copies runs them on its rows (loraplex.runtime.saved_modules; never merged).

How it works:
  - Wrapping. Each target Linear (or GPT-2 Conv1D, or loraplex QuantLinear) is replaced, once, by a
    `RuntimeLinear` that calls the base layer and then the current batch plan. The engine sets the plan once
    per forward; a batch where every row is base only runs with no plan (one attribute test per layer).
    The base model is modified in place (explicitly, at construction or load); `unwrap()` puts it back.
  - Targets. `target_modules` (names, a regex, or "all-linear", as in LoraConfig) wraps those modules up
    front and an adapter targeting any other module is refused with TargetNotFoundError. With
    `target_modules=None` (the default) modules are wrapped lazily: loading an adapter wraps whatever it
    targets that is not wrapped yet (a one-time change of the module tree; plans built before simply have
    no entry for the new layers, which none of their adapters target).
  - Adapters live in an `AdapterPool` slot each, unpadded, in the model's dtype and device, under
    `memory_budget_bytes`; evicted ones are re-read from their directory (checked by content hash).
    Identity is the content hash: `replace(name, dir)` puts the new version in a new slot; requests that
    hold a lease on the old version (a `Batch`, or `lease(name)`) keep it until they finish.
  - Switching adapters per call changes no module and no weight: only the plan (cached per batch
    composition) differs.
  - `generate` runs on the compact decoder the server runs (`compact_decoder()`, built once over the same
    base weights) when the base and the request allow it, else on the wrapped model (`runtime.steps`).
  - Merged mode: `merge(name)` adds scale * B @ A into the base weights (W' = W + dW). Every row then gets
    `name` for free; a row asking for anything else is served by subtracting: its assignment becomes
    {its adapters..., name: -1}, so None still means the bare base and other adapters stay exact up to
    rounding. `unmerge()` restores W bit for bit (the merge keeps the few elements rounding would lose).

One forward at a time runs through the model (an internal lock); batch rows are the unit of concurrency.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn as nn

from ..config import LoraConfig
from ..errors import (
    AdapterExistsError,
    AdapterFileError,
    AdapterNotFoundError,
    ConfigError,
    MergeStateError,
    ShapeMismatchError,
    TargetNotFoundError,
    UnsupportedFeatureError,
)
from ..functional import Residual, delta_weight, exact_merge, exact_restore, out_in, weight_layout
from ..identity import base_fingerprint, check_base
from ..inject import check_name, find_targets
from ..store import AdapterFile, PathLike, lora_modules, read_adapter
from .batch import Batch, RowSpec
from .decoder import ARCHITECTURES, CompactLlama
from .embedding import RuntimeEmbedding, served_tensors
from .pool import AdapterPool, Lease, PoolStats
from .rescale import dora_rescales
from .saved_modules import RuntimeModulesToSave, saved_copies
from .slots import PoolInput
from .store import AdapterStore
from .wrapper import CurrentPlan, RuntimeLinear, wrappable_features

LayerTensors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module name -> (A (r, in), B (out, r))


@dataclass
class _Merged:
    lease: Lease  # pins the merged version
    residuals: dict[str, Residual]  # key -> (flat indices, original values)
    bias_residuals: dict[str, Residual] = field(default_factory=dict)  # lora_bias: key -> the same, of the bias


class MultiLoraModel:
    """The multi-adapter engine over one loaded base model (see the module docstring).

    base_model: a torch model (HF causal LM for `generate`); modified in place: target layers are wrapped.
    target_modules: modules to wrap now (LoraConfig syntax); None = wrap lazily what loaded adapters target.
    memory_budget_bytes: cap on the adapter tensors kept in the fast tier (None = no cap).
    device: where the model and the adapters live (default: the model's device; the model is moved if not).
    store: an AdapterStore (or its folder) for `load_from_store`.
    tokenizer: for string prompts and texts in `generate`.
    max_plans: how many batch plans (per batch composition) to keep cached.
    """

    def __init__(
        self,
        base_model: nn.Module,
        *,
        target_modules: Union[list[str], str, None] = None,
        memory_budget_bytes: Optional[int] = None,
        device: Union[str, torch.device, None] = None,
        store: Union[AdapterStore, PathLike, None] = None,
        tokenizer: Any = None,
        max_plans: int = 8,
    ) -> None:
        first = next(base_model.parameters(), None)
        if first is None:
            raise ConfigError("base_model has no parameters; pass a loaded model")
        device = first.device if device is None else torch.device(device)
        if first.device != device:
            base_model.to(device)
        self.model = base_model
        self.tokenizer = tokenizer
        self.store = store if store is None or isinstance(store, AdapterStore) else AdapterStore(store)
        self.dtype = first.dtype
        self.pool = AdapterPool(budget_bytes=memory_budget_bytes, device=device, dtype=self.dtype,
                                loader=self._reload, max_plans=max_plans)
        self._current = CurrentPlan()
        self._lock = threading.RLock()
        self._wrapped: dict[str, Union[RuntimeLinear, RuntimeEmbedding]] = {}
        self._copied: dict[str, RuntimeModulesToSave] = {}  # modules some adapter holds modules_to_save copies of
        self._sources: dict[tuple[str, str], Path] = {}  # (name, content hash) -> directory, for reloads
        self._merged: Optional[_Merged] = None
        self._merge_epoch = 0
        self._decoder: Union[CompactLlama, UnsupportedFeatureError, None] = None  # built (or refused) once
        self._fingerprint = base_fingerprint(base_model)  # of the bare base, before any merge
        self.target_modules = target_modules
        if target_modules is not None:
            keys = find_targets(base_model, LoraConfig(target_modules=target_modules))
            modules = dict(base_model.named_modules())
            shapes = {k: _features(modules[k]) for k in keys}
            for k in keys:
                self._wrap(k, modules[k], shapes[k])

    # ---- wrapping -----------------------------------------------------------------------------------------
    @property
    def wrapped(self) -> list[str]:
        """Names of the modules currently wrapped."""
        return list(self._wrapped)

    def _wrap(self, key: str, module: nn.Module, shape: tuple[int, int]) -> None:
        embedding = isinstance(module, nn.Embedding)
        self.pool.register_layer(key, *shape, embedding=embedding)
        wrapper = (RuntimeEmbedding(module, key, self._current) if embedding
                   else RuntimeLinear(module, key, *shape, self._current))
        parent, _, child = key.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, child, wrapper)
        self._wrapped[key] = wrapper

    def unwrap(self) -> nn.Module:
        """Put the original modules back and return the base model (refused while an adapter is merged)."""
        with self._lock:
            if self._merged is not None:
                raise MergeStateError(f"adapter {self._merged.lease.name!r} is merged; unmerge() first")
            self._place(bare=True)
            self._wrapped.clear()
            self._copied.clear()
            return self.model

    def _place(self, *, bare: bool) -> None:
        """Put each wrapped module's base layer and each copied module's original (bare=True), or their runtime
        wrappers (bare=False), in the model."""
        for key, wrapper in self._wrapped.items():
            self._set_module(key, wrapper.base_layer if bare else wrapper)
        for key, copied in self._copied.items():
            self._set_module(key, copied.original_module if bare else copied)

    # ---- adapters -----------------------------------------------------------------------------------------
    def load(self, name: str, directory: Union[PathLike, AdapterFile], *, check_base_model: bool = True) -> str:
        """Load the adapter in `directory` as `name`; returns its content hash.

        Loading the same content again is a no-op; another content under a taken name is refused (use
        `replace`). The cost does not depend on how many adapters are loaded (nothing is re-stacked).
        """
        return self._add(name, directory, replace=False, check_base_model=check_base_model)

    def load_from_store(self, name: str, *, check_base_model: bool = True) -> str:
        """Load adapter `name` from the engine's adapter store folder; returns its content hash."""
        if self.store is None:
            raise ConfigError("this engine has no adapter store; pass store=AdapterStore(folder) (or a folder)")
        return self.load(name, self.store.path(name), check_base_model=check_base_model)

    def replace(self, name: str, directory: Union[PathLike, AdapterFile], *, check_base_model: bool = True) -> str:
        """Point `name` at a new version; requests holding the old one finish on it. Returns the new hash."""
        return self._add(name, directory, replace=True, check_base_model=check_base_model)

    def unload(self, name: str) -> None:
        """Forget `name`; requests holding a lease on it finish first (its memory is freed then)."""
        with self._lock:
            if self._merged is not None and self._merged.lease.name == name:
                raise MergeStateError(f"adapter {name!r} is merged into the base; unmerge() before unloading it")
            h = self.pool.content_hash(name)
            self.pool.remove(name)
            self._sources.pop((name, h), None)

    def names(self) -> list[str]:
        return self.pool.names()

    def __contains__(self, name: object) -> bool:
        return name in self.pool

    def content_hash(self, name: str) -> str:
        return self.pool.content_hash(name)

    @property
    def stats(self) -> PoolStats:
        return self.pool.stats

    def lease(self, name: str) -> Lease:
        """Pin the current version of `name` (use it as a row's adapter; release it when done)."""
        return self.pool.acquire(name)

    def _add(self, name: str, source: Union[PathLike, AdapterFile], *, replace: bool, check_base_model: bool) -> str:
        check_name(name)
        af = source if isinstance(source, AdapterFile) else read_adapter(source)
        tensors, scales, bias, rest = self._layer_tensors(af)
        with self._lock:
            if name in self.pool:
                old = self.pool.content_hash(name)
                if old == af.content_hash:
                    return old
                if not replace:
                    raise AdapterExistsError(
                        f"adapter {name!r} is loaded with content {old[:12]}, {str(af.path)!r} holds "
                        f"{af.content_hash[:12]}; use replace({name!r}, ...) to switch versions"
                    )
            elif replace:
                raise AdapterNotFoundError(f"cannot replace {name!r}: it is not loaded; loaded: {self.names()}")
            else:
                old = None
            if check_base_model and af.base_fingerprint and af.base_fingerprint != self._fingerprint:
                check_base(af.base_fingerprint, self.model, f"adapter {str(af.path)!r}")
            copies = saved_copies(af, rest, self._base_module) if rest else {}
            self._check_copies(name, tensors, copies)
            self._wrap_targets(name, tensors)
            for key in copies:
                if key not in self._copied:
                    self._copied[key] = RuntimeModulesToSave(self._base_module(key), key, self._current)
                    self._set_module(key, self._copied[key])
            dora = dora_rescales(af, tensors, scales, lambda k: (self._bare_weight(k), self._bare_bias(k)))
            self._sources[(name, af.content_hash)] = af.path
            self.pool.add(name, af.content_hash, tensors, scales, dora, bias, copies)
            if old is not None:
                self._sources.pop((name, old), None)  # a leased old version is never evicted: no reload needed
            return af.content_hash

    def _base_module(self, key: str) -> Optional[nn.Module]:
        """The base's module `key` (the original under a runtime wrapper), or None if there is none."""
        try:
            module = self.model.get_submodule(key)
        except AttributeError:
            return None
        if isinstance(module, (RuntimeLinear, RuntimeEmbedding)):
            return module.base_layer  # a LoRA target: a copy of it is refused by _check_copies, with its reason
        return module.original_module if isinstance(module, RuntimeModulesToSave) else module

    def _set_module(self, key: str, module: nn.Module) -> None:
        parent, _, child = key.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, child, module)

    def _check_copies(self, name: str, tensors: LayerTensors, copies: Mapping[str, object]) -> None:
        """Refuse a module that would be both a LoRA target and a modules_to_save copy (of any adapters): a copy
        runs a subset of the batch's rows, which a LoRA wrapper inside it cannot serve."""
        lora = [*self._wrapped, *tensors]
        copied = [*self._copied, *copies]
        clash = [(c, k) for c in copied for k in lora if k == c or k.startswith(c + ".")]
        if clash:
            raise UnsupportedFeatureError(
                f"adapter {name!r}: module {clash[0][0]!r} is a modules_to_save copy and {clash[0][1]!r} a LoRA "
                "target of the adapters of this engine; the runtime serves a module either copied or adapted. "
                "Serve these adapters on separate engines (or with loraplex.load_adapter)")

    def _wrap_targets(self, name: str, tensors: LayerTensors) -> None:
        new = [k for k in tensors if k not in self._wrapped]
        if not new:
            return
        if self.target_modules is not None:
            raise TargetNotFoundError(
                f"adapter {name!r} targets {new[:3]}{'...' if len(new) > 3 else ''}, which this engine did not "
                f"wrap (target_modules={self.target_modules!r}); build the engine with target_modules covering "
                "them (e.g. 'all-linear'), or with target_modules=None to wrap lazily"
            )
        modules = dict(self.model.named_modules())
        shapes = {}
        for k in new:  # check everything before changing the model
            if k not in modules:
                raise TargetNotFoundError(f"adapter {name!r} targets module {k!r}, which this base does not have")
            shapes[k] = _features(modules[k])
            A, B = tensors[k]
            if (A.shape[1], B.shape[0]) != shapes[k]:
                raise ShapeMismatchError(
                    f"adapter {name!r} at {k!r}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} do not fit a "
                    f"({shapes[k][0]} -> {shapes[k][1]}) layer (adapter made for another base?)"
                )
        for k in new:
            self._wrap(k, modules[k], shapes[k])

    def _layer_tensors(self, af: AdapterFile
                       ) -> tuple[LayerTensors, dict[str, float], dict[str, torch.Tensor], list[str]]:
        """{module: (A, B)}, {module: scale} and {module: LoRA-B bias} of an adapter file (runtime.embedding.
        served_tensors: LoRA of linear and embedding layers, trainable tokens as exact LoRA factors), and its other
        keys (modules_to_save copies: `saved_modules.saved_copies` reads or refuses them)."""
        tensors, scales, bias, rest = served_tensors(af, self.model, lora_modules(af))
        if not tensors:
            raise AdapterFileError(f"adapter {str(af.path)!r} holds no lora_A/lora_B tensors")
        return tensors, scales, bias, rest

    def _bare_weight(self, key: str) -> torch.Tensor:
        """The base weight of wrapped module `key` as (out, in), without a merged adapter (bit for bit)."""
        from ..quant.linear import QuantLinear  # lazy: loraplex.quant imports store, which imports inject

        base = self._wrapped[key].base_layer
        if isinstance(base, QuantLinear):
            return base.quantized_weight().dequantize(torch.float32)  # merging into a quantized base is refused
        w = self._restored(key) if self._merged is not None and key in self._merged.residuals else self._weight(key)
        return out_in(w, weight_layout(base))

    def _reload(self, name: str, content_hash: str) -> PoolInput:
        """The pool's loader: re-read an evicted adapter from its directory, refusing a changed file."""
        path = self._sources.get((name, content_hash))
        if path is None:
            raise AdapterFileError(f"no source known for adapter {name!r} ({content_hash[:12]})")
        af = read_adapter(path)
        if af.content_hash != content_hash:
            raise AdapterFileError(
                f"adapter {name!r} was evicted and {str(path)!r} now holds content {af.content_hash[:12]}, not the "
                f"loaded {content_hash[:12]}; call replace({name!r}, {str(path)!r}) to serve the new version"
            )
        tensors, scales, bias, rest = self._layer_tensors(af)
        return PoolInput(tensors, scales, bias, saved_copies(af, rest, self._base_module) if rest else {})

    # ---- running ------------------------------------------------------------------------------------------
    def batch(self, adapters: Optional[Sequence[RowSpec]]) -> Batch:
        """Open a `Batch` for these per-row adapters (leases + plan); use it across a generation's steps."""
        if adapters is None or isinstance(adapters, (str, Mapping, Lease)):
            raise ConfigError(
                f"adapters is a list with one entry per batch row (a name, None, or {{name: weight}}), got {adapters!r}"
            )
        return Batch(self, list(adapters))

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                adapters: Optional[Sequence[RowSpec]] = None, **model_kwargs: Any) -> torch.Tensor:
        """Logits (B, T, vocab) with row b served by adapters[b] (a name, None = base, or {name: weight}).

        adapters=None serves every row with the base only (or with the merged adapter, when one is merged).
        """
        B = input_ids.shape[0]
        rows = [None] * B if adapters is None else list(adapters)
        if len(rows) != B:
            raise ShapeMismatchError(f"adapters has {len(rows)} entries for a batch of {B} rows; give one per row")
        with self.batch(rows) as b:
            return b(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs).logits

    __call__ = forward

    def generate(self, prompts: Sequence[Union[str, Sequence[int]]], adapters: Optional[Sequence[RowSpec]] = None,
                 **kwargs: Any) -> list:
        """Batched generation, each row with its own adapter; see `loraplex.runtime.generate.generate`."""
        from .generate import generate

        return generate(self, prompts, adapters, **kwargs)

    def compact_decoder(self) -> CompactLlama:
        """The compact decoder (`runtime.decoder.CompactLlama`, what the server runs) over this base's weights,
        built on first use and kept until a merge changes them; it registers its seven projections per layer
        with the pool, so plans cover them. Memory: up to one more copy of the base weights (fused q/k/v and
        gate/up; oneDNN's reordered copies: docs/runtime.md). UnsupportedFeatureError says why the base cannot
        run on it (not a Llama-family causal LM, a non-nn.Linear projection, an adapter merged); kept, so
        asking again is free."""
        with self._lock:
            if self._merged is not None:
                raise UnsupportedFeatureError(
                    f"adapter {self._merged.lease.name!r} is merged into the base weights; the compact decoder "
                    "serves the bare base (unmerge() first, or generate with backend='hf')")
            if self._decoder is None:
                self._decoder = self._build_decoder()
            if isinstance(self._decoder, UnsupportedFeatureError):
                raise UnsupportedFeatureError(str(self._decoder))
            return self._decoder

    def _build_decoder(self) -> Union[CompactLlama, UnsupportedFeatureError]:
        mtype = getattr(getattr(self.model, "config", None), "model_type", None)
        if mtype not in ARCHITECTURES or not hasattr(self.model, "lm_head"):
            return UnsupportedFeatureError(
                f"the compact decoder runs Llama-family causal LMs {ARCHITECTURES}; got {type(self.model).__name__} "
                f"with model_type {mtype!r}")
        self._place(bare=True)  # CompactLlama reads plain nn.Linear projections: the bare ones, while it reads them
        try:
            decoder = CompactLlama(self.model)
        except UnsupportedFeatureError as e:
            return e
        finally:
            self._place(bare=False)
        for key, (fin, fout) in decoder.layer_shapes().items():
            self.pool.register_layer(key, fin, fout)
        return decoder

    # ---- merged mode --------------------------------------------------------------------------------------
    @property
    def merged(self) -> Optional[str]:
        """The name of the merged adapter, or None."""
        return None if self._merged is None else self._merged.lease.name

    @torch.no_grad()
    def merge(self, name: str) -> None:
        """Add adapter `name` into the base weights: W' = W + scale * B @ A (see the module docstring)."""
        with self._lock:
            if self._merged is not None:
                raise MergeStateError(f"adapter {self._merged.lease.name!r} is merged already; unmerge() first")
            if self.pool.is_dora(name):
                raise UnsupportedFeatureError(
                    f"adapter {name!r} is DoRA: merging it would rescale the rows of W that every other request "
                    "reads, so the runtime serves DoRA unmerged (loraplex.merge merges it into a model of its own)"
                )
            if self.pool.has_copies(name):
                raise UnsupportedFeatureError(
                    f"adapter {name!r} holds modules_to_save copies: merging would replace those modules for every "
                    "row, so the runtime serves it unmerged (loraplex.merge merges it into a model of its own)"
                )
            lease = self.pool.acquire(name)
            self._decoder = None  # its fused weight copies would go stale; rebuilt after unmerge()
            try:
                layers = [(k, t) for k in self._wrapped if (t := self.pool.tensors(lease.slot, k)) is not None]
                for k, _ in layers:
                    base = self._wrapped[k].base_layer
                    if not (isinstance(base, nn.Linear)
                            or (not isinstance(base, nn.Embedding) and weight_layout(base) == "in_out")):
                        raise UnsupportedFeatureError(
                            f"cannot merge into {k!r} ({type(base).__name__}); the runtime "
                            "merges into float Linear/Conv1D weights only (serve a quantized base unmerged)"
                        )
                biased = [(k, b, t[2]) for k, t in layers if (b := self.pool.lora_bias(lease.slot, k)) is not None]
                bare = [k for k, _, _ in biased if getattr(self._wrapped[k].base_layer, "bias", None) is None]
                if bare:
                    raise UnsupportedFeatureError(
                        f"adapter {name!r} has a LoRA-B bias (lora_bias) at {bare[0]!r}, whose base layer has no bias "
                        "to merge it into (PEFT cannot merge it either); serve it unmerged"
                    )
                residuals = {k: self._add_delta(k, *t) for k, t in layers}
                bias_residuals = {k: self._add_bias(k, b, scale) for k, b, scale in biased}
            except BaseException:
                lease.release()
                raise
            self._merged = _Merged(lease, residuals, bias_residuals)
            self._merge_epoch += 1

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the merged adapter out of the base weights again, restoring them bit for bit."""
        with self._lock:
            if self._merged is None:
                raise MergeStateError("no adapter is merged")
            m = self._merged
            for k in m.residuals:
                self._weight(k).copy_(self._restored(k))
            for k in m.bias_residuals:
                self._wrapped[k].base_layer.bias.data.copy_(self._bare_bias(k))
            self._merged = None
            self._merge_epoch += 1
            m.lease.release()

    def _restored(self, key: str) -> torch.Tensor:
        """The weight of `key` (storage layout) with the merged adapter taken out exactly (W' - dW + residual)."""
        m = self._merged
        A, B, scale = self.pool.tensors(m.lease.slot, key)
        w = self._weight(key)
        d = self._delta(key, A, B, scale, w)
        return exact_restore(w, lambda t: t - d, m.residuals[key])

    def _add_bias(self, key: str, b: torch.Tensor, scale: float) -> Residual:
        """bias <- bias + scale * b (a lora_bias adapter's merge); returns what bias' - scale * b would not give back."""
        bias = self._wrapped[key].base_layer.bias.data
        d = scale * b.to(torch.promote_types(bias.dtype, torch.float32))
        merged, _, residual = exact_merge(bias, lambda t: t + d, lambda t: t - d)
        bias.copy_(merged)
        return residual

    def _bare_bias(self, key: str) -> torch.Tensor | None:
        """The base bias of wrapped module `key` without a merged adapter's LoRA-B bias (bit for bit), or None."""
        bias = getattr(self._wrapped[key].base_layer, "bias", None)
        m = self._merged
        if bias is None or m is None or key not in m.bias_residuals:
            return bias
        b = self.pool.lora_bias(m.lease.slot, key)
        d = self.pool.tensors(m.lease.slot, key)[2] * b.to(torch.promote_types(bias.dtype, torch.float32))
        return exact_restore(bias.data, lambda t: t - d, m.bias_residuals[key])

    def _weight(self, key: str) -> torch.Tensor:
        return self._wrapped[key].base_layer.weight.data

    def _delta(self, key: str, A: torch.Tensor, B: torch.Tensor, scale: float, w: torch.Tensor) -> torch.Tensor:
        """scale * B @ A in the layout of weight `w` (Conv1D stores (in, out)), in float32 or wider."""
        compute = torch.promote_types(w.dtype, torch.float32)
        d = delta_weight(A.to(compute), B.to(compute), scale)  # (out, in)
        return out_in(d, weight_layout(self._wrapped[key].base_layer))

    def _add_delta(self, key: str, A: torch.Tensor, B: torch.Tensor, scale: float) -> Residual:
        """W <- W + dW; returns the (flat index, original value) pairs that W' - dW would not give back."""
        w = self._weight(key)
        d = self._delta(key, A, B, scale, w)
        merged, _, residual = exact_merge(w, lambda t: t + d, lambda t: t - d)
        w.copy_(merged)
        return residual


def _features(module: nn.Module) -> tuple[int, int]:
    """(in, out) of a module the engine wraps: (num_embeddings, embedding_dim) for an nn.Embedding."""
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    return wrappable_features(module)
