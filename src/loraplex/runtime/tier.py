"""The fast tier of an `AdapterPool`: the slots whose tensors plans can read now, and their bytes under a budget.

The fast tier is CUDA when the pool's device is CUDA, else CPU RAM. Its size is capped by `budget_bytes`; when
an add or a reload needs room, the least recently used adapters that nobody leases are evicted from it. Where
an evicted adapter comes back from:
  - `loader(name, content_hash) -> {layer_key: (A, B)}` when one is given (e.g. read from an adapter store);
  - otherwise a CPU copy, when the fast tier is not CPU;
  - otherwise nowhere: a CPU pool without a loader never evicts and raises PoolFullError when full.
Reloaded content is checked against a fingerprint taken at `add` (`slots.reload`), so a loader that returns
another version (a replaced file on disk) fails loudly instead of serving stale weights.
Eviction drops a slot's A, B and modules_to_save copies (`SlotEntry.nbytes`); its DoRA [g; c] and LoRA-B biases
(`SlotEntry.kept_bytes`, small) stay for the slot's whole life and count against the budget all along.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence

import torch

from ..errors import PoolFullError
from .slots import Loader, SlotEntry, reload


class FastTier:
    """Residency of one pool's slots (`entries`, shared with the pool; the pool's lock guards both): bytes in
    use, least recently used order, eviction and reload. `on_evict(slot)` runs after a slot's tensors are
    dropped (the pool drops the cached plans that read them)."""

    def __init__(self, entries: Mapping[int, SlotEntry], *, budget_bytes: int | None, device: torch.device,
                 dtype: torch.dtype, loader: Loader | None, on_evict: Callable[[int], None]) -> None:
        self.entries = entries
        self.budget_bytes = budget_bytes
        self.device, self.dtype = device, dtype
        self.loader = loader
        self.on_evict = on_evict
        self.resident_bytes = 0
        self.lru: OrderedDict[int, None] = OrderedDict()  # resident slots, least recently used first
        self.counts = dict(hits=0, misses=0, evictions=0)

    @property
    def can_evict(self) -> bool:
        """Whether an evicted slot can come back (from the loader, or from a CPU copy off CPU)."""
        return self.loader is not None or self.device.type != "cpu"

    @property
    def keeps_cpu_copy(self) -> bool:
        """Whether a new slot needs a CPU copy to come back from (off CPU, no loader)."""
        return self.loader is None and self.device.type != "cpu"

    def admit(self, slot: int, nbytes: int) -> None:
        """Count `nbytes` more in use, for `slot` now resident (most recently used)."""
        self.resident_bytes += nbytes
        self.lru[slot] = None

    def touch(self, slot: int) -> None:
        if slot in self.lru:
            self.lru.move_to_end(slot)

    def make_room(self, nbytes: int, *, what: str, keep: frozenset[int] = frozenset()) -> None:
        """Evict least recently used, unleased adapters (not in `keep`) until `nbytes` more fit the budget."""
        if self.budget_bytes is None or self.resident_bytes + nbytes <= self.budget_bytes:
            return
        if nbytes > self.budget_bytes:
            raise PoolFullError(f"{what} needs {nbytes} bytes; the pool budget is {self.budget_bytes} bytes")
        if self.can_evict:
            for slot in list(self.lru):
                if self.resident_bytes + nbytes <= self.budget_bytes:
                    return
                if self.entries[slot].refs == 0 and slot not in keep:
                    self.evict(slot)
        if self.resident_bytes + nbytes > self.budget_bytes:
            why = ("the rest is leased or needed by this batch" if self.can_evict
                   else "a CPU pool without a loader cannot evict (pass loader=...)")
            raise PoolFullError(
                f"{what} needs {nbytes} bytes; {self.resident_bytes} of {self.budget_bytes} are in use and "
                f"{why}; raise budget_bytes or release leases"
            )

    def evict(self, slot: int) -> None:
        e = self.entries[slot]
        e.fast, e.saved = None, {}
        self.resident_bytes -= e.nbytes
        del self.lru[slot]
        self.counts["evictions"] += 1
        self.on_evict(slot)  # cached plans may read its tensors: let the memory go

    def ensure_resident(self, slots: Sequence[int], on_reload: Callable[[int], None]) -> None:
        """Bring the evicted ones of `slots` back (making room without evicting any of `slots`); `on_reload(slot)`
        runs after each."""
        keep = frozenset(slots)
        for slot in slots:
            e = self.entries[slot]
            if e.fast is not None:
                self.counts["hits"] += 1
                self.touch(slot)
                continue
            self.counts["misses"] += 1
            self.make_room(e.nbytes, what=f"reloading adapter {e.name!r}", keep=keep)
            e.fast, e.saved = reload(e, self.loader, dtype=self.dtype, device=self.device)
            self.admit(slot, e.nbytes)
            on_reload(slot)

    def forget(self, slot: int, e: SlotEntry) -> None:
        """Stop counting freed slot `slot` (its entry `e`, already out of `entries`)."""
        self.resident_bytes -= e.kept_bytes
        if e.fast is not None:
            self.resident_bytes -= e.nbytes
            del self.lru[slot]
