"""What a request is and what comes back: sampling parameters, the result, the handle, sampling itself.

A request's listener gets events in order, on the engine thread: ("delta", text, token_id) for every piece
of final text (token_id None for the tail flushed at the end), then ("done", Result).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import LoraplexError, RequestTimeoutError


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False


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



def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """One token from softmax(logits / temperature), keeping the smallest top set of mass >= top_p."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (V,)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        drop = sorted_p.cumsum(0) - sorted_p >= top_p  # mass before this token already reaches top_p
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=generator))
