"""What a request is and what comes back: sampling parameters (runtime.generate.SamplingParams, checked when
built), the result, the handle.

A request's listener gets events in order, on the engine thread: ("prompt", [TokenLogprob | None, ...]) once
after prefill when the request asked for prompt logprobs; ("delta", text, token_id, TokenLogprob | None) for
every generated token that completes text or carries logprobs (text may be "" when it is held back: an
incomplete UTF-8 character or a possible stop string), and ("delta", tail, None, None) for text flushed at
the end; then ("done", Result).

Logprobs are vLLM's default "raw" mode: log_softmax of the model's logits over the whole vocabulary, before
logit_bias, penalties and temperature (so they do not depend on the sampling values).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..errors import LoraplexError, RequestTimeoutError
from ..runtime.generate import SamplingParams


@dataclass(frozen=True)
class TokenLogprob:
    """One position: the token there, its raw logprob, and the `k` most likely tokens with theirs."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob), most likely first; k entries


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int], k: int | Sequence[int]) -> list[TokenLogprob]:
    """logits (n, V) and the token taken at each of the n positions -> their raw logprobs (log_softmax over
    the vocabulary) with the k (one k, or one per position) most likely alternatives."""
    lp = torch.log_softmax(logits.float(), dim=-1)  # (n, V)
    ks = [k] * len(tokens) if isinstance(k, int) else list(k)
    chosen = lp.gather(1, torch.tensor(list(tokens), device=lp.device)[:, None])[:, 0].tolist()  # (n,)
    kmax = min(max(ks, default=0), lp.shape[1])
    vals, ids = lp.topk(kmax, dim=-1) if kmax else (lp[:, :0], lp[:, :0].long())  # (n, kmax)
    vals, ids = vals.tolist(), ids.tolist()
    return [TokenLogprob(t, c, tuple(zip(ids[j][:kj], vals[j][:kj])))
            for j, (t, c, kj) in enumerate(zip(tokens, chosen, ks))]


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

__all__ = ["Event", "Handle", "Listener", "Result", "SamplingParams", "TokenLogprob", "token_logprobs"]


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

