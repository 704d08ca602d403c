"""What a request is and what comes back: sampling parameters (runtime.sampling.SamplingParams, checked when
built), the result, the handle.

A request's listener gets events in order, on the engine thread: ("prompt", [TokenLogprob | None, ...]) once
after prefill when the request asked for prompt logprobs; ("delta", text, token_id, TokenLogprob | None) for
every generated token that completes text or carries logprobs (text may be "" when it is held back: an
incomplete UTF-8 character or a possible stop string), and ("delta", tail, None, None) for text flushed at
the end; then ("done", Result).

Logprobs are vLLM's default "raw" mode (runtime/logprobs.py `TokenLogprob`, `token_logprobs`: log_softmax
of the model's logits over the whole vocabulary, before logit_bias, penalties and temperature).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import LoraplexError, RequestTimeoutError
from ..runtime.sampling import SamplingParams
from ..runtime.logprobs import TokenLogprob


@dataclass
class Result:
    text: str
    token_ids: list[int]  # generated ids (an end-of-sequence token that stopped the row included)
    finish_reason: str  # "stop" (eos or a stop string), "length", "cancelled", "error"
    prompt_tokens: int
    completion_tokens: int
    error: LoraplexError | None = None
    logprobs: list[TokenLogprob] | None = None  # one per generated token, when params.logprobs is not None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # one per prompt token (the first: None)
    cumulative_logprob: float = 0.0  # sum of the generated tokens' raw logprobs (0 without logprobs)


# Events given to a request's listener, in order (see the module docstring).
Event = tuple
Listener = Callable[[Event], None]

__all__ = ["Event", "Handle", "Listener", "Result", "SamplingParams", "TokenLogprob"]


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

