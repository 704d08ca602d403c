"""The engine's waiting requests: one FIFO per `model` value, served round-robin over the values.

`head()` is the request whose turn it is: the oldest of the model key at the front of the turns; `pop(key)`
takes the oldest request of `key` and sends `key` to the back of the turns (or drops it when its queue is
empty), so a hot adapter with a long queue cannot starve the others. Not thread-safe: the engine holds its lock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator

from .sequence import RequestState


class WaitQueues:
    """Waiting requests per model key, with the round-robin order of the keys (see the module docstring)."""

    def __init__(self) -> None:
        self._queues: dict[str, deque[RequestState]] = {}  # model key -> its queue, in arrival order
        self._turns: deque[str] = deque()  # model keys with waiting requests, round-robin order
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[RequestState]:
        return (s for q in self._queues.values() for s in q)

    def push(self, s: RequestState) -> None:
        if s.key not in self._queues:
            self._queues[s.key] = deque()
            self._turns.append(s.key)
        self._queues[s.key].append(s)
        self._n += 1

    def next_key(self) -> str | None:
        """The model key whose turn it is (None when nothing waits)."""
        return self._turns[0] if self._turns else None

    def has(self, key: str) -> bool:
        return key in self._queues

    def head(self, key: str) -> RequestState:
        """The oldest waiting request of `key` (which has one)."""
        return self._queues[key][0]

    def oldest_step(self) -> int:
        """The engine step at which the longest-waiting request was queued (something waits)."""
        return min(q[0].queued_step for q in self._queues.values())

    def pop(self, key: str) -> RequestState:
        """Take the oldest request of `key` and move `key` to the back of the turns (or drop it if empty)."""
        q = self._queues[key]
        s = q.popleft()
        self._n -= 1
        self._turns.remove(key)
        if q:
            self._turns.append(key)
        else:
            del self._queues[key]
        return s

    def remove_if(self, drop: Callable[[RequestState], bool]) -> list[RequestState]:
        """Take out every waiting request for which `drop` is true; returns them (queue order kept for the rest)."""
        out: list[RequestState] = []
        for key in list(self._queues):
            q = self._queues[key]
            gone = [s for s in q if drop(s)]
            for s in gone:
                q.remove(s)
            self._n -= len(gone)
            out += gone
            if not q:
                del self._queues[key]
                self._turns.remove(key)
        return out
