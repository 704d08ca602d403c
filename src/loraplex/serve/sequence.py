"""One request inside the engine: its state from submit to finish, the stop rules, and how it ends.

`finite_rows` says which rows of a batch's logits are finite; `sample_tokens` draws the next token of several
requests at once (the one sampler, runtime/sampling.py), with their logprobs where asked.
`RequestState.accept(token)` records a generated token, hands the listener its text delta (held back while it
may be part of a stop string, see serve/text.py `Detokenizer`) and says whether the request ends there:
"stop" on an end-of-sequence id (unless ignore_eos) or a stop string, "length" at max_tokens or when the KV
lane is full. `finish` releases the request's adapter leases, flushes held-back text, records the metrics and
hands the listener the final `Result` (events: serve/requests.py); `drop` ends one early (cancelled, timed
out, shutdown). The scheduling is serve/engine.py.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass, field

import torch

from ..errors import LoraplexError, RequestTimeoutError, ShuttingDownError
from ..runtime import Lease
from ..runtime.sampling import sample_next
from ..runtime.logprobs import TokenLogprob, token_logprobs
from .metrics import Metrics
from .modelspec import Mix
from .requests import Handle, Result, SamplingParams
from .text import Detokenizer


@dataclass
class RequestState:
    handle: Handle
    key: str  # the normalised model spec (fairness queue and metrics label)
    mix: Mix
    prompt: list[int]
    params: SamplingParams
    detok: Detokenizer
    submitted: float
    deadline: float
    generator: torch.Generator | None
    queued_step: int  # engine step count when submitted
    gen: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per gen token when params.logprobs is set
    prompt_logprobs: list[TokenLogprob | None] | None = None
    cumulative_logprob: float = 0.0
    last_token: float = 0.0  # time.monotonic() of the last generated token
    leases: list[Lease] = field(default_factory=list)
    assignment: tuple[tuple[int, float], ...] = ()
    lane: int = -1
    finished: bool = False

    def accept(self, token: int, logprob: TokenLogprob | None, *, eos_ids: Collection[int], context: int,
               metrics: Metrics) -> str | None:
        """Record `token`; the finish reason when the request ends with it ("stop", "length"), else None."""
        now = time.monotonic()
        metrics.token(self.key, not self.gen, now - (self.last_token if self.gen else self.submitted))
        self.last_token = now
        self.gen.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
            self.cumulative_logprob += logprob.logprob
        if token in eos_ids and not self.params.ignore_eos:
            if logprob is not None:
                self.handle._emit(("delta", "", token, logprob))
            return "stop"
        delta = self.detok.push(token)
        if delta or logprob is not None:
            self.handle._emit(("delta", delta, token, logprob))
        if self.detok.stopped:
            return "stop"
        if len(self.gen) >= self.params.max_tokens or len(self.prompt) + len(self.gen) >= context:
            return "length"
        return None

    def finish(self, reason: str, metrics: Metrics, error: LoraplexError | None = None) -> None:
        """End the request (once; later calls do nothing): release its leases, emit the rest and the Result."""
        if self.finished:
            return
        self.finished = True
        for lease in self.leases:
            lease.release()
        self.leases = []
        if error is None:
            tail = self.detok.flush()
            if tail:
                self.handle._emit(("delta", tail, None, None))
        status = "ok" if error is None and reason != "cancelled" else ("cancelled" if error is None else "error")
        metrics.request_done(self.key, status, len(self.prompt) if self.gen or self.prompt_logprobs else 0,
                             len(self.gen), time.monotonic() - self.submitted)
        self.handle._emit(("done", Result(self.detok.text if error is None else "", list(self.gen), reason,
                                          len(self.prompt), len(self.gen), error,
                                          self.logprobs if self.params.logprobs is not None else None,
                                          self.prompt_logprobs, self.cumulative_logprob)))

    def drop(self, metrics: Metrics, *, shutdown: bool, timeout_s: float | None) -> None:
        """End the request before it ran out: the server stops (shutdown), it was cancelled, or it timed out."""
        if shutdown:
            self.finish("error", metrics, ShuttingDownError("the server stopped before this request finished"))
        elif self.handle.cancelled:
            self.finish("cancelled", metrics)
        else:
            self.finish("error", metrics, RequestTimeoutError(
                f"the request ran past its time limit of {timeout_s} s (--timeout); "
                f"{len(self.gen)} tokens were generated"))


def finite_rows(logits: torch.Tensor) -> list[bool]:
    """Whether each row of logits (n, V) is all finite. A finite row sum proves it (one pass, no (n, V) mask);
    a sum can also overflow over finite values, so only the rows whose sum is not finite are checked elementwise."""
    ok = torch.isfinite(logits.sum(-1)).tolist()  # (n,)
    return [True if o else bool(torch.isfinite(logits[i]).all()) for i, o in enumerate(ok)]


def sample_tokens(rows: list[RequestState], logits: torch.Tensor) -> list[tuple[int, TokenLogprob | None]]:
    """Finite logits (n, V) of `rows` -> each row's next token and, when it asked for them, its logprobs."""
    tokens = sample_next(logits, [s.params for s in rows], [s.generator for s in rows],
                         [(s.prompt, s.gen) for s in rows]).tolist()
    want = [j for j, s in enumerate(rows) if s.params.logprobs is not None]
    entries: list[TokenLogprob | None] = [None] * len(rows)
    if want:
        got = token_logprobs(logits[want], [tokens[j] for j in want], [rows[j].params.logprobs for j in want])
        for j, e in zip(want, got):
            entries[j] = e
    return list(zip(tokens, entries))
