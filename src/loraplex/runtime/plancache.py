"""The `AdapterPool`'s cache of batch plans and of the per-slot layer views plans are built from.

A `BatchPlan` is keyed by (per-row assignments, strategy) and reused only while every slot it reads still
holds the content version it was built from (`BatchPlan.versions`); at most the pool's `max_plans` are
kept, least recently used dropped first. `views` is `build_plan`'s memo: per single-slot assignment, its layer views.
When a slot's content goes away (evicted, freed), `drop(slot)` forgets everything that reads it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from .ops import Assignment, BatchPlan, Strategy

PlanKey = tuple[tuple[Assignment, ...], Strategy]  # (per-row assignments, strategy)


class PlanCache:
    """Cached plans plus the single-slot layer views memo."""

    def __init__(self) -> None:
        self._plans: OrderedDict[PlanKey, BatchPlan] = OrderedDict()
        self.views: dict[Assignment, dict] = {}  # build_plan's memo: per single-slot assignment, its layer views

    def get(self, key: PlanKey, version: Callable[[int], int | None]) -> BatchPlan | None:
        """The cached plan for `key` if every slot it reads still has the version it was built from
        (`version(slot)`: the slot's current version, None when it is free), else None."""
        plan = self._plans.get(key)
        if plan is None or any(version(s) != v for s, v in plan.versions.items()):
            return None
        self._plans.move_to_end(key)
        return plan

    def put(self, key: PlanKey, plan: BatchPlan, max_plans: int) -> None:
        """Keep `plan`, then drop the least recently used beyond `max_plans` (0: keep none)."""
        if max_plans:
            self._plans[key] = plan
            while len(self._plans) > max_plans:
                self._plans.popitem(last=False)

    def drop(self, slot: int) -> None:
        """Forget cached plans and layer views that read `slot` (its content is going away)."""
        for k in [k for k, p in self._plans.items() if slot in p.versions]:
            del self._plans[k]
        for k in [k for k in self.views if k[0][0] == slot]:
            del self.views[k]

    def clear(self) -> None:
        """Forget everything (the registered layers changed: plans cover the layers they were built with)."""
        self._plans.clear()
        self.views.clear()
