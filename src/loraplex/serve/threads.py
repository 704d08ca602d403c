"""The server's own torch work (building the model, loading adapters) runs on threads that end right after it, so
that the engine thread holds the process's only OpenMP team.

GNU OpenMP (PyTorch's on Linux) keeps a pool of worker threads for every thread that has run a parallel region,
until that thread exits. While more such workers exist than CPUs, every team's workers stop spinning between
parallel regions and sleep (libgomp's throttled spin), and each of the ~1,000 small ops of a decode step then
pays a wake-up: a SmolLM2 decode step at batch 16, 2 threads on 2 CPUs, took 38 ms on the engine thread when the
model had been built on another living thread, 26 ms when that thread had ended (or on the main thread alone).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def in_fresh_thread(fn: Callable[..., T], *args, **kwargs) -> T:
    """fn(*args, **kwargs) on a new (daemon) thread that ends when fn returns; its result, or its error re-raised."""
    out: list = []

    def run() -> None:
        try:
            out.append((True, fn(*args, **kwargs)))
        except BaseException as exc:  # handed to the caller's thread, raised there
            out.append((False, exc))

    t = threading.Thread(target=run, name=f"loraplex-{getattr(fn, '__name__', 'work')}", daemon=True)
    t.start()
    t.join()
    ok, value = out[0]
    if not ok:
        raise value
    return value


async def to_fresh_thread(fn: Callable[..., T], *args, **kwargs) -> T:
    """`in_fresh_thread` from the event loop (the loop's executor thread only waits for the join)."""
    return await asyncio.to_thread(in_fresh_thread, fn, *args, **kwargs)
