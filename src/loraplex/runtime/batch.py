"""Batch: one batch composition (an adapter, a mix or None per row) held open across forwards.

    with engine.batch(["tone", None, {"tone": 0.5, "style": 0.5}]) as b:   # leases + a cached plan
        logits = b(input_ids=ids, attention_mask=mask).logits               # prefill, then decode steps
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Optional, TypeVar, Union

import torch

from ..errors import ConfigError, LeaseError, MergeStateError, UnsupportedFeatureError
from .ops import Assignment, BatchPlan
from .pool import Lease

if TYPE_CHECKING:
    from .model import MultiLoraModel

R = TypeVar("R")

# What a caller may pass for one row: a name, None (base only), a Lease (a pinned version), or a weighted mix.
RowSpec = Union[str, None, Lease, Mapping[Union[str, Lease], float]]


class Batch:
    """One batch composition held open across forwards (a generation's prefill and decode steps).

    Holds a lease on every adapter version its rows use, so replacing or evicting an adapter meanwhile
    changes nothing for it. Call it like the HF model (it returns the model output); `close()` (or `with`)
    releases the leases.
    """

    def __init__(self, engine: MultiLoraModel, adapters: Sequence[RowSpec]) -> None:
        self.engine = engine
        self.leases: list[Lease] = []
        self._own: dict[str, Lease] = {}  # name -> lease taken by this batch
        self._epoch = -1
        self.plan: Optional[BatchPlan] = None
        try:
            self.wanted = [self._resolve(a) for a in adapters]  # per row {slot: weight}, before merge
            self._refresh()
        except BaseException:
            self.close()
            raise

    def _slot(self, ref: Union[str, Lease]) -> int:
        if isinstance(ref, Lease):
            if ref.pool is not self.engine.pool:
                raise LeaseError(f"lease on {ref.name!r} belongs to another engine")
            return ref.slot
        if not isinstance(ref, str):
            raise ConfigError(f"an adapter is named by a string (or a Lease), got {ref!r}")
        lease = self._own.get(ref)
        if lease is None:
            lease = self._own[ref] = self.engine.pool.acquire(ref)
            self.leases.append(lease)
        return lease.slot

    def _resolve(self, a: RowSpec) -> dict[int, float]:
        if a is None:
            return {}
        if isinstance(a, (str, Lease)):
            return {self._slot(a): 1.0}
        if isinstance(a, Mapping):
            out: dict[int, float] = {}
            for ref, w in a.items():
                s = self._slot(ref)
                out[s] = out.get(s, 0.0) + float(w)
            dora = [s for s in out if self.engine.pool.is_dora_slot(s)]
            if dora and (len(out) > 1 or out[dora[0]] != 1.0):
                raise UnsupportedFeatureError(
                    f"a weighted mix {dict(a)!r} includes a DoRA adapter: DoRA rescales the row's whole output by its "
                    "own magnitude, so mixes with it are not defined; serve a DoRA adapter alone in its row"
                )
            copies = [s for s in out if self.engine.pool.has_copies_slot(s)]
            if copies and (len(out) > 1 or out[copies[0]] != 1.0):
                raise UnsupportedFeatureError(
                    f"a weighted mix {dict(a)!r} includes an adapter with modules_to_save copies: a weighted mix of "
                    "whole modules is not defined, so serve such an adapter alone in its row"
                )
            return out
        raise ConfigError(
            f"a row's adapter is a name, None, a Lease or a {{name: weight}} mix; got {type(a).__name__} {a!r}"
        )

    def _refresh(self) -> None:
        """(Re)build the plan if the engine's merge state changed since it was built."""
        eng = self.engine
        if self._epoch == eng._merge_epoch:
            return
        rows: list[Assignment] = []
        for want in self.wanted:
            want = dict(want)
            if eng._merged is not None:  # the merged adapter is in every row already: take it out where unwanted
                m = eng._merged.lease.slot
                want[m] = want.get(m, 0.0) - 1.0
            rows.append(tuple((s, w) for s, w in want.items() if w != 0.0))
        self.assignments = rows
        self.plan = eng.pool.plan(rows) if any(rows) else None
        self._epoch = eng._merge_epoch

    @property
    def num_rows(self) -> int:
        return len(self.wanted)

    def __call__(self, **model_kwargs: Any) -> Any:
        """model(**model_kwargs) with this batch's plan applied; batch size must equal the number of rows."""
        eng = self.engine
        if self.leases is None:
            raise LeaseError("this batch is closed")
        with eng._lock, torch.inference_mode():
            self._refresh()
            eng._current.plan = self.plan
            try:
                return eng.model(**model_kwargs)
            finally:
                eng._current.plan = None

    def run(self, forward: Callable[[Optional[BatchPlan]], R]) -> R:
        """forward(plan) under the engine's lock, with this batch's plan: for a forward over the base weights that
        does not go through the wrapped model (the compact decoder). Refused (MergeStateError) once a merge or
        unmerge has changed the base weights since the batch opened: such a forward keeps state built from the
        old weights (a KV cache, fused weight copies)."""
        eng = self.engine
        if self.leases is None:
            raise LeaseError("this batch is closed")
        with eng._lock, torch.inference_mode():
            if self._epoch != eng._merge_epoch:
                raise MergeStateError("a merge or unmerge changed the base weights while this generation ran on "
                                      "the compact decoder; generate again")
            return forward(self.plan)

    def close(self) -> None:
        if self.leases is None:
            return
        for lease in self.leases:
            lease.release()
        self.leases = None  # type: ignore[assignment]

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
