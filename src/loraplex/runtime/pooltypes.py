"""What an `AdapterPool` (loraplex.runtime.pool) hands out: a `Lease` on one adapter version, and `PoolStats`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .pool import AdapterPool


@dataclass(frozen=True)
class Lease:
    """A hold on one version of an adapter: its slot keeps that content until released (also `with`)."""

    name: str
    slot: int
    version: int
    content_hash: str
    pool: AdapterPool = field(repr=False, compare=False)
    lease_id: int = field(repr=False)

    def release(self) -> None:
        self.pool.release(self)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass(frozen=True)
class PoolStats:
    """Counters and sizes of one pool (`AdapterPool.stats`), taken together."""

    hits: int  # an adapter needed by acquire/plan was already in the fast tier
    misses: int  # it had to be reloaded into the fast tier
    evictions: int  # adapters dropped from the fast tier to make room
    adapters: int  # slots in use (names + retired versions still leased)
    resident: int  # of which in the fast tier
    resident_bytes: int
    budget_bytes: int | None
    plan_builds: int
    plan_hits: int  # plan() answered from the cache
