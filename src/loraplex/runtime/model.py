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
  - Wrapping (runtime.wrapping). Each target Linear (or GPT-2 Conv1D, or loraplex QuantLinear) is replaced,
    once, by a `RuntimeLinear` that calls the base layer and then the current batch plan. The engine sets the plan once
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
  - Merged mode (runtime.merged): `merge(name)` adds scale * B @ A into the base weights (W' = W + dW).
    Every row then gets `name` for free; a row asking for anything else is served by subtracting: its
    assignment becomes {its adapters..., name: -1}, so None still means the bare base and other adapters stay
    exact up to rounding. `unmerge()` restores W bit for bit (the merge keeps the few elements rounding would
    lose).

One forward at a time runs through the model (an internal lock); batch rows are the unit of concurrency.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn as nn

from ..errors import (AdapterExistsError, AdapterFileError, AdapterNotFoundError, ConfigError, MergeStateError,
                      ShapeMismatchError, UnsupportedFeatureError)
from ..functional import out_in, weight_layout
from ..identity import base_fingerprint, check_base
from ..inject import check_name
from ..store import AdapterFile, PathLike, lora_modules, read_adapter
from .batch import Batch, RowSpec
from .decoder import ARCHITECTURES, CompactLlama
from .embedding import served_tensors
from .merged import Merged, merge_into
from .pool import AdapterPool, Lease, PoolStats
from .rescale import dora_rescales
from .saved_modules import saved_copies
from .slots import PoolInput
from .store import AdapterStore
from .wrapper import CurrentPlan
from .wrapping import LayerTensors, ModuleTree


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
        self._sources: dict[tuple[str, str], Path] = {}  # (name, content hash) -> directory, for reloads
        self._merged: Optional[Merged] = None
        self._merge_epoch = 0
        self._decoder: Union[CompactLlama, UnsupportedFeatureError, None] = None  # built (or refused) once
        self._fingerprint = base_fingerprint(base_model)  # of the bare base, before any merge or wrapping
        self.target_modules = target_modules
        self._tree = ModuleTree(base_model, self.pool, self._current, target_modules)  # wraps target_modules now

    # ---- wrapping -----------------------------------------------------------------------------------------
    @property
    def wrapped(self) -> list[str]:
        """Names of the modules currently wrapped."""
        return list(self._tree.wrapped)

    def unwrap(self) -> nn.Module:
        """Put the original modules back and return the base model (refused while an adapter is merged)."""
        with self._lock:
            if self._merged is not None:
                raise MergeStateError(f"adapter {self._merged.lease.name!r} is merged; unmerge() first")
            self._tree.unwrap()
            return self.model

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
            copies = saved_copies(af, rest, self._tree.base_module) if rest else {}
            self._tree.check_copies(name, tensors, copies)
            self._tree.wrap_targets(name, tensors)
            self._tree.copy(copies)
            dora = dora_rescales(af, tensors, scales, lambda k: (self._bare_weight(k), self._bare_bias(k)))
            self._sources[(name, af.content_hash)] = af.path
            self.pool.add(name, af.content_hash, tensors, scales, dora, bias, copies)
            if old is not None:
                self._sources.pop((name, old), None)  # a leased old version is never evicted: no reload needed
            return af.content_hash

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

        base = self._tree.wrapped[key].base_layer
        if isinstance(base, QuantLinear):
            return base.quantized_weight().dequantize(torch.float32)  # merging into a quantized base is refused
        m = self._merged
        w = m.weight(key) if m is not None and key in m.residuals else base.weight.data
        return out_in(w, weight_layout(base))

    def _bare_bias(self, key: str) -> torch.Tensor | None:
        """The base bias of wrapped module `key` without a merged adapter's LoRA-B bias (bit for bit), or None."""
        bias = getattr(self._tree.wrapped[key].base_layer, "bias", None)
        m = self._merged
        return m.bias(key) if bias is not None and m is not None and key in m.bias_residuals else bias

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
        return PoolInput(tensors, scales, bias, saved_copies(af, rest, self._tree.base_module) if rest else {})

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
        self._tree.place(bare=True)  # CompactLlama reads plain nn.Linear projections: the bare ones, while it reads
        try:
            decoder = CompactLlama(self.model)
        except UnsupportedFeatureError as e:
            return e
        finally:
            self._tree.place(bare=False)
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
                merged = merge_into({k: w.base_layer for k, w in self._tree.wrapped.items()}, lease)
            except BaseException:
                lease.release()
                raise
            self._merged = merged
            self._merge_epoch += 1

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the merged adapter out of the base weights again, restoring them bit for bit."""
        with self._lock:
            if self._merged is None:
                raise MergeStateError("no adapter is merged")
            m = self._merged
            m.restore()
            self._merged = None
            self._merge_epoch += 1
            m.lease.release()
