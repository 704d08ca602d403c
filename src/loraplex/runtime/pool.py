"""Slot storage for the LoRA adapters of ONE model, under a memory budget in bytes.

In the API an adapter is a `name`; here it lives in a `slot` (an int; -1 in an assignment = base only).
Identity is (name, content_hash): adding a name again with another hash puts the new content in a NEW slot
and retires the old one, which keeps serving the requests that leased it until they release it; new
leases get the new slot. A slot's `version` (unique over the pool's life) changes whenever the slot holds
new content, so a cached `BatchPlan` built from old content is never reused.

Tiers. The fast tier holds the tensors that plans read: CUDA when `device="cuda"` is given and available,
else CPU RAM, capped by `budget_bytes`; the least recently used adapters nobody leases are evicted from it when
room is needed and come back from `loader` (or a CPU copy) when used again (`loraplex.runtime.tier`).

A DoRA adapter also has, at each of its layers, a [g; c] (2, out) tensor (loraplex.runtime.rescale). These
are small (2 * out values per layer), stay in the fast tier for the slot's whole life (eviction drops A and B
only) and count against the budget while the slot exists; so do a lora_bias adapter's b (out,) per layer
(loraplex.runtime.rowbias). modules_to_save copies (loraplex.runtime.saved_modules; large: a whole lm_head)
are fast-tier tensors like A and B: evicted with them and brought back by the loader (or the CPU copy).

Embedding layers (`register_layer(..., embedding=True)`, e.g. the input embedding (vocab, dim)) hold embedding LoRA
and trainable tokens in the same slots (A (r, vocab), Bt (r, dim)); a plan applies them by gathering
(`BatchPlan.embeddings`, loraplex.runtime.embedding), never through `build_plan`'s stacks.

Each adapter is stored at its own rank per layer (no padding to the largest rank); adding or removing one
costs the same whatever the number loaded: per-batch stacks are built by `plan`, not kept here.
What a slot holds and the checks on add/reload: `loraplex.runtime.slots`; the plan cache: `.plancache`;
`Lease` and `PoolStats`: `.pooltypes`.

Example:
    pool = AdapterPool({"layers.0.q_proj": (512, 512)}, budget_bytes=64 << 20)
    pool.add("legal", "sha256:ab12..", {"layers.0.q_proj": (A, B)}, {"layers.0.q_proj": 2.0})
    with pool.acquire("legal") as lease:
        plan = pool.plan([lease.slot, -1])  # row 0 uses "legal", row 1 the base only
        plan.apply_("layers.0.q_proj", x, y)  # y[0] += 2.0 * (x[0] @ A.T) @ B.T
"""

from __future__ import annotations

import heapq
import itertools
import threading
import warnings
from collections.abc import Mapping, Sequence

import torch

from ..errors import AdapterNotFoundError, ConfigError, LeaseError, PoolFullError, ShapeMismatchError
from .embedding import embedding_layers
from .ops import AssignmentLike, BatchPlan, Strategy, build_plan, lora_compute_dtype, normalize_assignment
from .plancache import PlanCache
from .pooltypes import Lease, PoolStats
from .slots import LayerTensors, Loader, SlotEntry, check_adapter, new_entry
from .strategies import layer_views
from .tier import FastTier


class AdapterPool:
    """LoRA tensors for one model's target layers, one slot per adapter version, under a byte budget.

    layers: {layer_key: (in_features, out_features)} (more via `register_layer`).
    dtype: storage and compute dtype of the fast tier (the model's dtype).
    max_plans: how many batch plans to cache (each holds copies of its batch's adapters).
    """

    def __init__(
        self,
        layers: Mapping[str, tuple[int, int]] | None = None,
        *,
        budget_bytes: int | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        loader: Loader | None = None,
        max_plans: int = 8,
    ) -> None:
        if budget_bytes is not None and budget_bytes < 0:
            raise ConfigError(f"budget_bytes must be >= 0 or None (no limit), got {budget_bytes}")
        if max_plans < 0:
            raise ConfigError(f"max_plans must be >= 0, got {max_plans}")
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            warnings.warn("AdapterPool: CUDA is not available; the fast tier is CPU RAM", stacklevel=2)
            device = torch.device("cpu")
        self.device = device
        self.dtype = dtype
        self.max_plans = max_plans
        self._layers: dict[str, tuple[int, int]] = {}
        self._embeddings: set[str] = set()  # keys of embedding layers among _layers
        self._entries: dict[int, SlotEntry] = {}  # slot -> entry
        self._by_name: dict[str, int] = {}  # name -> current slot
        self._free: list[int] = []  # heap of freed slot indices, reused smallest first
        self._next_slot = 0
        self._versions = itertools.count(1)
        self._lease_ids = itertools.count(1)
        self._leases: dict[int, int] = {}  # outstanding lease id -> slot
        self._plans = PlanCache()
        self._tier = FastTier(self._entries, budget_bytes=budget_bytes, device=device, dtype=dtype, loader=loader,
                              on_evict=self._plans.drop)
        self._counts = dict(plan_builds=0, plan_hits=0)
        self._lock = threading.RLock()
        for key, (fin, fout) in (layers or {}).items():
            self.register_layer(key, fin, fout)

    @property
    def budget_bytes(self) -> int | None:
        """Cap on the fast tier's bytes (None = no cap)."""
        return self._tier.budget_bytes

    @property
    def loader(self) -> Loader | None:
        """Where evicted adapters are read back from: (name, content_hash) -> their tensors (None = nowhere)."""
        return self._tier.loader

    @loader.setter
    def loader(self, loader: Loader | None) -> None:
        self._tier.loader = loader

    # ---- layers -------------------------------------------------------------------------------------------
    def register_layer(self, key: str, in_features: int, out_features: int, *, embedding: bool = False) -> None:
        """Declare a target layer; re-registering the same shape is a no-op. An embedding layer (vocab, dim) holds
        embedding LoRA (A (r, vocab), B (dim, r)) and is applied by gathering (loraplex.runtime.embedding)."""
        with self._lock:
            if key in self._layers and (key in self._embeddings) != embedding:
                raise ShapeMismatchError(f"layer {key!r} is registered already, as "
                                         f"{'a linear' if embedding else 'an embedding'} layer")
            shape = (int(in_features), int(out_features))
            if min(shape) <= 0:
                raise ConfigError(f"layer {key!r}: features must be positive, got {shape}")
            old = self._layers.get(key)
            if old is not None and old != shape:
                raise ShapeMismatchError(f"layer {key!r} is registered as (in, out) = {old}, got {shape}")
            if old is None:
                self._layers[key] = shape
                if embedding:
                    self._embeddings.add(key)
                self._plans.clear()  # plans cover the layers registered when they were built

    @property
    def layers(self) -> dict[str, tuple[int, int]]:
        return dict(self._layers)

    @property
    def embeddings(self) -> frozenset[str]:
        """Keys of the registered embedding layers."""
        return frozenset(self._embeddings)

    # ---- names and slots ----------------------------------------------------------------------------------
    def add(self, name: str, content_hash: str, tensors: LayerTensors, scales: Mapping[str, float],
            dora: Mapping[str, torch.Tensor] | None = None, bias: Mapping[str, torch.Tensor] | None = None,
            saved: Mapping[str, Mapping[str, torch.Tensor]] | None = None) -> int:
        """Store an adapter (copies of `tensors`, in the pool's dtype and device) and return its slot.

        tensors: {layer_key: (A (r, in), B (out, r))}; scales: {layer_key: scale} for the same keys. Layers not
        listed get no update from this adapter. dora: for a DoRA adapter, {layer_key: [g; c] (2, out)} for the
        layers where it is DoRA (see loraplex.runtime.rescale). bias: for a lora_bias adapter, {layer_key: b (out,)}
        (loraplex.runtime.rowbias). saved: modules_to_save copies {module key: state dict}
        (loraplex.runtime.saved_modules). Same name and hash again: returns the existing slot.
        Same name, new hash: a new slot; the old one serves its leases until released, then is freed.
        """
        with self._lock:
            if not isinstance(name, str) or not name:
                raise ConfigError(f"adapter name must be a non-empty string, got {name!r}")
            if not isinstance(content_hash, str) or not content_hash:
                raise ConfigError(f"content_hash must be a non-empty string, got {content_hash!r}")
            cur = self._by_name.get(name)
            if cur is not None and self._entries[cur].content_hash == content_hash:
                self._tier.touch(cur)
                return cur
            checked = check_adapter(name, tensors, scales, dora or {}, bias or {}, saved or {}, self._layers,
                                    dtype=self.dtype, device=self.device)
            old = self._entries[cur] if cur is not None else None
            # an unleased old version is freed right after: its bytes count as available
            credit = old.nbytes if old is not None and old.refs == 0 and old.fast is not None else 0
            keep = frozenset([cur]) if credit else frozenset()
            self._tier.make_room(max(0, checked.nbytes + checked.kept_bytes - credit), what=f"adapter {name!r}",
                                 keep=keep)
            entry = new_entry(name, content_hash, next(self._versions), tensors, checked, dtype=self.dtype,
                              device=self.device, cpu_copy=self._tier.keeps_cpu_copy)
            slot = heapq.heappop(self._free) if self._free else self._new_slot()
            self._entries[slot] = entry
            self._tier.admit(slot, checked.nbytes + checked.kept_bytes)
            self._by_name[name] = slot
            if cur is not None:
                self._retire(cur)
            self._prepare_views(slot)
            return slot

    def remove(self, name: str) -> None:
        """Forget `name`; its slot is freed now, or when its last lease is released."""
        with self._lock:
            self._retire(self._slot_of(name))
            del self._by_name[name]

    def slot(self, name: str) -> int:
        """The slot currently holding `name` (new requests should `acquire` instead, to pin it)."""
        with self._lock:
            return self._slot_of(name)

    def names(self) -> list[str]:
        with self._lock:
            return list(self._by_name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __len__(self) -> int:
        return len(self._by_name)

    def content_hash(self, name: str) -> str:
        with self._lock:
            return self._entries[self._slot_of(name)].content_hash

    def version(self, slot: int) -> int:
        """The content version held by `slot` (changes whenever the slot is reused for other content)."""
        with self._lock:
            return self._live(slot).version

    # ---- leases -------------------------------------------------------------------------------------------
    def acquire(self, name: str) -> Lease:
        """Pin the current version of `name` in the fast tier (reloading it if evicted) until released."""
        with self._lock:
            slot = self._slot_of(name)
            e = self._entries[slot]
            self._tier.ensure_resident([slot], self._prepare_views)
            e.refs += 1
            lid = next(self._lease_ids)
            self._leases[lid] = slot
            return Lease(name, slot, e.version, e.content_hash, self, lid)

    def release(self, lease: Lease) -> None:
        with self._lock:
            if lease.pool is not self or self._leases.get(lease.lease_id) != lease.slot:
                raise LeaseError(f"lease on {lease.name!r} (slot {lease.slot}) was already released "
                                 "or belongs to another pool")
            del self._leases[lease.lease_id]
            e = self._entries[lease.slot]
            e.refs -= 1
            if e.retired and e.refs == 0:
                self._free_slot(lease.slot)

    # ---- batch plans --------------------------------------------------------------------------------------
    def plan(self, assignments: Sequence[AssignmentLike], *, strategy: Strategy = "auto") -> BatchPlan:
        """The `BatchPlan` for one batch: assignments[b] is row b's slot (-1 = base only) or [(slot, weight)].

        Cached by the tuple of assignments; a cached plan is reused only while every slot it reads still
        holds the same content version. See `loraplex.runtime.ops` for the math.
        """
        rows = tuple(normalize_assignment(a) for a in assignments)
        key = (rows, strategy)
        with self._lock:
            cached = self._plans.get(key, lambda s: self._entries[s].version if s in self._entries else None)
            if cached is not None:
                self._counts["plan_hits"] += 1
                for s in cached.versions:
                    self._tier.touch(s)
                return cached
            slots = sorted({s for a in rows for s, _ in a})
            for s in slots:
                self._live(s)
            self._tier.ensure_resident(slots, self._prepare_views)
            plan = build_plan(self._get, rows, self._linear(), dtype=self.dtype, device=self.device,
                              strategy=strategy, memo=self._plans.views, rescale=self._rescale, bias=self._bias,
                              saved=self._saved)
            plan.embeddings = embedding_layers(
                self._get, rows, {k: self._layers[k] for k in self._embeddings}, dtype=self.dtype,
                compute=lora_compute_dtype(self.dtype, self.device), device=self.device)
            plan.versions.update({s: self._entries[s].version for s in slots})
            self._counts["plan_builds"] += 1
            self._plans.put(key, plan, self.max_plans)
            return plan

    def tensors(self, slot: int, key: str) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(A (r, in), B (out, r), scale) of a resident slot at layer `key`, or None if it has no LoRA there.

        The pool's own storage: read it, never write to it.
        """
        with self._lock:
            e = self._live(slot)
            if e.fast is None:
                raise PoolFullError(f"slot {slot} ({e.name!r}) is evicted; acquire it to bring it back")
            return self._get(slot, key)

    # ---- stats --------------------------------------------------------------------------------------------
    @property
    def stats(self) -> PoolStats:
        with self._lock:
            return PoolStats(
                adapters=len(self._entries), resident=len(self._tier.lru), resident_bytes=self._tier.resident_bytes,
                budget_bytes=self.budget_bytes, **self._tier.counts, **self._counts,
            )

    @property
    def resident_bytes(self) -> int:
        return self._tier.resident_bytes

    def is_resident(self, name: str) -> bool:
        with self._lock:
            return self._entries[self._slot_of(name)].fast is not None

    # ---- internals ----------------------------------------------------------------------------------------
    def _get(self, slot: int, key: str) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        return self._entries[slot].lora(key)

    def _rescale(self, slot: int, key: str) -> torch.Tensor | None:
        return self._entries[slot].dora.get(key)

    def _bias(self, slot: int, key: str) -> tuple[torch.Tensor, float] | None:
        e = self._entries[slot]
        b = e.bias.get(key)
        return None if b is None else (b, e.scales[key])

    def is_dora(self, name: str) -> bool:
        """Whether the current version of `name` is a DoRA adapter."""
        with self._lock:
            return bool(self._entries[self._slot_of(name)].dora)

    def _saved(self, slot: int) -> dict[str, dict[str, torch.Tensor]]:
        return self._entries[slot].saved

    def has_copies(self, name: str) -> bool:
        """Whether the current version of `name` holds modules_to_save copies."""
        with self._lock:
            return bool(self._entries[self._slot_of(name)].saved_keys)

    def has_copies_slot(self, slot: int) -> bool:
        """Whether `slot` holds modules_to_save copies."""
        with self._lock:
            return bool(self._live(slot).saved_keys)

    def lora_bias(self, slot: int, key: str) -> torch.Tensor | None:
        """The LoRA-B bias b (out,) of `slot` at layer `key`, or None (the pool's own storage: never write to it)."""
        with self._lock:
            return self._live(slot).bias.get(key)

    def is_dora_slot(self, slot: int) -> bool:
        """Whether `slot` holds a DoRA adapter."""
        with self._lock:
            return bool(self._live(slot).dora)

    def _slot_of(self, name: str) -> int:
        slot = self._by_name.get(name)
        if slot is None:
            raise AdapterNotFoundError(f"adapter {name!r} is not in the pool; loaded: {sorted(self._by_name)}")
        return slot

    def _live(self, slot: int) -> SlotEntry:
        e = self._entries.get(slot)
        if e is None:
            raise AdapterNotFoundError(
                f"slot {slot} holds no adapter (freed or never used); acquire a name to get a live slot"
            )
        return e

    def _new_slot(self) -> int:
        self._next_slot += 1
        return self._next_slot - 1

    def _prepare_views(self, slot: int) -> None:
        """Memoize the per-layer views of `slot` at weight 1 now, so its first plan (an adapter switch) does
        not build them."""
        layer_views(self._get, ((slot, 1.0),), self._linear(), dtype=self.dtype, device=self.device,
                    memo=self._plans.views)

    def _linear(self) -> dict[str, tuple[int, int]]:
        """The registered layers but the embeddings (which plans apply by gathering, not through build_plan)."""
        return {k: v for k, v in self._layers.items() if k not in self._embeddings}

    def _retire(self, slot: int) -> None:
        e = self._entries[slot]
        e.retired = True
        if e.refs == 0:
            self._free_slot(slot)

    def _free_slot(self, slot: int) -> None:
        self._tier.forget(slot, self._entries.pop(slot))
        heapq.heappush(self._free, slot)
        self._plans.drop(slot)

