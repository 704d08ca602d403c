"""What a request is and what comes back: sampling parameters (runtime.generate.SamplingParams, checked when
built), the result, the handle.

A request's listener gets events in order, on the engine thread: ("delta", text, token_id) for every piece
of final text (token_id None for the tail flushed at the end), then ("done", Result).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import LoraplexError, RequestTimeoutError
from ..runtime.generate import SamplingParams


@dataclass
class Result:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (eos or a stop string), "length", "cancelled", "error"
    prompt_tokens: int
    completion_tokens: int
    error: LoraplexError | None = None


# Events given to a request's listener, in order: ("delta", text, token_id)*, then ("done", Result).
Event = tuple
Listener = Callable[[Event], None]

__all__ = ["Event", "Handle", "Listener", "Result", "SamplingParams"]


class Handle:
    """A submitted request: `result()` waits for it, `cancel()` drops it at the next step."""

    def __init__(self, rid: int, model: str, listener: Listener | None) -> None:
        self.id = rid
        self.model = model
        self._listener = listener
        self._done = threading.Event()
        self._result: Result | None = None
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> Result:
        if not self._done.wait(timeout):
            raise RequestTimeoutError(f"request {self.id} did not finish within {timeout} s")
        return self._result

    def _emit(self, event: Event) -> None:
        if event[0] == "done":
            self._result = event[1]
        if self._listener is not None:
            self._listener(event)
        if event[0] == "done":
            self._done.set()

