"""The serving engine: continuous batching of requests that each name an adapter, the base, or a mix.

A request's `model` is resolved once, when it is submitted, into (adapter name, weight) pairs (the base
alone, one adapter, or a weighted mix "legal:0.7+tone:0.3": serve/modelspec.py). Its adapters are leased
from the pool when it starts running, so it finishes on the versions it started with even if they are
replaced or removed meanwhile.

One `step()`:
  1. drop cancelled and timed-out requests (queued or running);
  2. admit waiting requests into free lanes, taking them round-robin over the distinct `model` values
     (one request per model per turn), so a hot adapter with a long queue cannot starve the others;
  3. prefill the admitted requests together (right-padded) and sample their first token;
  4. decode one token for every running request in one batch, rows with different adapters side by side,
     and retire the finished ones.
Requests therefore join and leave the running batch at every step. Greedy output does not depend on what
else runs in the batch (checked by tests/serve/test_serve_engine.py).

A request never stops the engine: what can go wrong with one request fails that request alone, with a typed
error: its adapter cannot be (re)loaded when it is admitted (files gone or changed after an eviction), or its
logits are not finite (then its KV lane is zeroed, so the next request on that lane reads no NaN). Sampling
values are bounded when `SamplingParams` is built, and the sampler cannot fail on finite logits. Only an
error in the batched forward itself (a bug) fails every request and stops the engine.

Lanes and LoRA. A request keeps its KV-cache lane (= its batch row) from admission to finish; a finished
request leaves a dead row behind (decoded and ignored) until a new request takes the lane. With two or more
distinct assignments running, the batch's LoRA lives in per-lane stacks (serve/lanes.py) that admission
writes one lane at a time; with one (or for rows a stack cannot hold: DoRA, biases, copies) it is the pool's
`BatchPlan`. The compiled decode step reads the lane stacks as they are, so it uses them for one distinct
assignment too. Admission happens when nothing runs, when at least `admit_min` lanes
are free, or when the oldest waiting request has waited `admit_wait_steps` steps.

`single_adapter=True` is the naive baseline for benchmarks: the batch holds one `model` value at a time
(requests for other adapters wait until it empties), as a server that swaps one active adapter would.

One request's state, its stop rules and how it ends are serve/sequence.py `RequestState`; the waiting
requests serve/queues.py `WaitQueues`; this module schedules.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..errors import ConfigError, LoraplexError, NonFiniteError, PoolFullError, QueueFullError, ShuttingDownError
from ..runtime import AdapterPool, BatchPlan
from ..runtime.decoder import CompactLlama
from ..runtime.logprobs import token_logprobs
from .lanes import LaneBatch, LaneLora
from .metrics import Metrics
from .modelspec import Mix, lease_mix, model_key, parse_model
from .queues import WaitQueues
from .requests import Handle, Listener, Result, SamplingParams
from .sequence import RequestState, finite_rows, sample_tokens
from .text import Detokenizer, TextCodec, check_prompt


@dataclass
class EngineConfig:
    max_batch: int = 16  # running sequences (KV cache lanes)
    max_queue: int = 256  # waiting requests before 429
    max_prompt_tokens: int = 1024
    max_new_tokens: int = 512
    timeout_s: float | None = 300.0  # per request, queue wait included; None = no limit
    # new rows x padded prompt length prefilled in one step; a larger wave goes over several steps, so the first
    # rows answer sooner (64 clients x 16-token prompts on SmolLM2: TTFT p50 ~0.5 s, 0.66-0.83 s at 4096)
    max_prefill_tokens: int = 512
    admit_min: int | None = None  # free lanes that trigger admission; None = max(1, max_batch // 4)
    admit_wait_steps: int = 4  # ... or steps the oldest waiting request has waited
    single_adapter: bool = False  # baseline mode: a batch only ever holds requests of one `model` value

    def __post_init__(self) -> None:
        if self.admit_min is None:
            self.admit_min = max(1, self.max_batch // 4)
        for k in ("max_batch", "max_queue", "max_prompt_tokens", "max_new_tokens", "max_prefill_tokens",
                  "admit_min", "admit_wait_steps"):
            if not isinstance(getattr(self, k), int) or getattr(self, k) < 1:
                raise ConfigError(f"{k} must be an integer >= 1, got {getattr(self, k)!r}")
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise ConfigError(f"timeout_s must be > 0 or None, got {self.timeout_s!r}")


class Engine:
    """Continuous-batching generation over a CompactLlama and an AdapterPool (see the module docstring)."""

    def __init__(self, model: CompactLlama, pool: AdapterPool, codec: TextCodec, *, base_ids: Sequence[str],
                 config: EngineConfig | None = None, metrics: Metrics | None = None,
                 on_step: Callable[[], None] | None = None) -> None:
        self.model, self.pool, self.codec = model, pool, codec
        self.base_ids = tuple(base_ids)  # names that mean "the base alone"; the first is the canonical one
        self.config = config or EngineConfig()
        self.metrics = metrics or Metrics()
        self.on_step = on_step  # called after every step (the server polls pool evictions there)
        need = self.config.max_prompt_tokens + self.config.max_new_tokens
        if need > model.max_positions:
            raise ConfigError(f"max_prompt_tokens + max_new_tokens = {need} exceeds the model's "
                              f"{model.max_positions} positions; lower one of them")
        self.context = need
        self.cache = model.new_cache(max_lanes=self.config.max_batch, max_len=need)
        self.lora = LaneLora(pool, self.config.max_batch)  # the running batch's LoRA, per lane
        self._cond = threading.Condition()
        self._queue = WaitQueues()  # waiting requests, per model key (serve/queues.py)
        self.lanes: list[RequestState | None] = []  # batch row = KV cache lane; None = free (a dead row)
        self._layout: tuple = ()  # the assignments self._plan was built for, one per lane
        self._plan = None
        self._ids = 0
        self.accepting = True
        self.failed: BaseException | None = None
        self._stop = False
        self._abort = False
        self._thread: threading.Thread | None = None
        self.steps = 0

    # ---- requests -----------------------------------------------------------------------------------------
    def parse_model(self, spec: str) -> Mix:
        """A request's `model` as (adapter, weight) pairs (serve/modelspec.py); unknown names -> 404."""
        return parse_model(spec, self.base_ids, self.pool)

    def submit(self, prompt: Sequence[int], model: str, params: SamplingParams | None = None, *,
               listener: Listener | None = None) -> Handle:
        """Queue a request (thread-safe). Raises 429/413/400/404-type errors at once; see `Handle`."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ConfigError(f"params must be a SamplingParams, got {type(params).__name__}")
        if params.max_tokens > self.config.max_new_tokens:
            raise ConfigError(f"max_tokens is {params.max_tokens}; this server generates at most "
                              f"{self.config.max_new_tokens} (--max-new-tokens)")
        ids = check_prompt(prompt, vocab=self.model.vocab, max_prompt_tokens=self.config.max_prompt_tokens)
        bad = [i for i, _ in params.logit_bias if i >= self.model.vocab]
        if bad:
            raise ConfigError(f"logit_bias names token ids {bad[:5]} outside the vocabulary [0, {self.model.vocab})")
        mix = self.parse_model(model)
        key = model_key(mix, self.base_ids[0])
        with self._cond:
            if not self.accepting or self.failed is not None:
                raise ShuttingDownError("the server is shutting down and takes no new requests"
                                        if self.failed is None else f"the engine stopped after an error: {self.failed!r}")
            if len(self._queue) >= self.config.max_queue:
                raise QueueFullError(f"{len(self._queue)} requests are waiting (--queue-size "
                                     f"{self.config.max_queue}); retry later")
            self._ids += 1
            now = time.monotonic()
            seq = RequestState(Handle(self._ids, key, listener), key, mix, ids, params,
                               Detokenizer(self.codec, params.stop, ids), now,
                               now + self.config.timeout_s if self.config.timeout_s else math.inf,
                               params.generator(self.model.device), self.steps)
            self._queue.push(seq)
            self._cond.notify_all()
        return seq.handle

    def generate(self, prompt: Sequence[int], model: str, params: SamplingParams | None = None) -> Result:
        """Submit and wait (steps the engine itself when no background thread runs)."""
        h = self.submit(prompt, model, params)
        while self._thread is None and not h.done:
            self.step()
        return h.result()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> list[RequestState]:
        return [s for s in self.lanes if s is not None]

    # ---- the step -----------------------------------------------------------------------------------------
    def step(self) -> bool:
        """One scheduling step (see the module docstring); returns False when there was nothing to do."""
        self._expire()
        new = self._admit()
        if new:
            self._prefill(new)
        if any(s is not None for s in self.lanes):
            self._decode()
        self.steps += 1
        if self.on_step is not None:
            self.on_step()
        return bool(new or self.running)

    def _expire(self) -> None:
        now = time.monotonic()
        with self._cond:
            for s in self._queue.remove_if(lambda s: s.handle.cancelled or now > s.deadline or self._abort):
                s.drop(self.metrics, shutdown=self._abort, timeout_s=self.config.timeout_s)
        for s in self.running:
            if s.handle.cancelled or now > s.deadline or self._abort:
                s.drop(self.metrics, shutdown=self._abort, timeout_s=self.config.timeout_s)
        self._retire()

    def _admit(self) -> list[RequestState]:
        free = [i for i, s in enumerate(self.lanes) if s is None]
        free += list(range(len(self.lanes), self.config.max_batch))
        running = self.config.max_batch - len(free)
        new: list[RequestState] = []
        longest = 0
        with self._cond:
            if not len(self._queue) or not free:
                return new
            if running and len(free) < self.config.admit_min and \
                    self.steps - self._queue.oldest_step() < self.config.admit_wait_steps:
                return new
            current = next((s.key for s in self.lanes if s is not None), None)
            while free and len(self._queue):
                key = self._queue.next_key()
                if self.config.single_adapter and current is not None and key != current:
                    if not self._queue.has(current):
                        break
                    key = current
                current = key
                s = self._queue.head(key)
                longest2 = max(longest, len(s.prompt))
                if new and (len(new) + 1) * longest2 > self.config.max_prefill_tokens:
                    break
                try:
                    s.leases = lease_mix(self.pool, s.mix)
                except PoolFullError as exc:
                    if running or new:
                        break  # room comes back when running requests finish
                    self._queue.pop(key)
                    self._finish(s, "error", exc)
                    continue
                except LoraplexError as exc:  # removed or replaced by a DoRA version (in a mix) after it was queued, or its files fail to reload
                    self._queue.pop(key)
                    self._finish(s, "error", exc)
                    continue
                self._queue.pop(key)
                s.assignment = tuple((lease.slot, w) for lease, (_, w) in zip(s.leases, s.mix))
                s.lane = free.pop(0)
                if s.lane == len(self.lanes):
                    self.lanes.append(None)
                self.lanes[s.lane] = s
                new.append(s)
                longest = longest2
        if new:  # the layout changed: one new plan for the decode batch
            while self.lanes and self.lanes[-1] is None:
                self.lanes.pop()
            self._layout = tuple(s.assignment if s is not None else () for s in self.lanes)
            self.lora.shrink([s.lane for s in self.lanes if s is not None and all(s is not t for t in new)])
            self._plan = self._batch_plan(self._layout, range(len(self._layout)))
        return new

    def _batch_plan(self, assignments: Sequence[tuple], lanes: Sequence[int]) -> LaneBatch | BatchPlan | None:
        """The LoRA of a batch whose row i runs assignments[i] in lane lanes[i] (see the module docstring); for one
        distinct assignment, eager decode uses the pool's segment plan, which reads the pool's own tensors and copies
        nothing."""
        distinct = {a for a in assignments if a}
        if not distinct:
            return None
        if len(distinct) > 1 or self.model.compiled:  # a compiled step reads dense per-row stacks either way
            batch = self.lora.rows(assignments, lanes)
            if batch is not None:
                return batch
        return self.pool.plan(assignments)

    def _prefill(self, new: list[RequestState]) -> None:
        L = max(len(s.prompt) for s in new)
        ids = torch.zeros(len(new), L, dtype=torch.long)
        for i, s in enumerate(new):
            ids[i, : len(s.prompt)] = torch.tensor(s.prompt)
        lengths = torch.tensor([len(s.prompt) for s in new])
        plan = self._batch_plan([s.assignment for s in new], [s.lane for s in new])
        echo = [s for s in new if s.params.prompt_logprobs is not None]
        out = self.model.prefill(ids.to(self.model.device), lengths, self.cache, [s.lane for s in new], plan,
                                 hidden=bool(echo))
        logits, hidden = out if echo else (out, None)  # (n, V), (n, L, H)
        for i, s in enumerate(new):
            if s.params.prompt_logprobs is None:
                continue
            # a one-row plan of this request's assignment: its lm_head copy and the head's LoRA rows (tied tokens)
            row_plan = self.pool.plan([s.assignment]) if s.assignment else None
            lp = self.model.head(hidden[i : i + 1, : len(s.prompt) - 1], row_plan)[0]  # (len - 1, V): j predicts j + 1
            if not torch.isfinite(lp).all():
                self.cache.clear_lane(s.lane)
                self._finish(s, "error", NonFiniteError(
                    f"the model's scores over the prompt for model {s.key!r} are NaN/Inf (the adapter weights "
                    "times the mix weights overflow); lower the mix weights or check the adapter"))
                continue
            s.prompt_logprobs = [None, *token_logprobs(lp, s.prompt[1:], s.params.prompt_logprobs)]
            s.handle._emit(("prompt", s.prompt_logprobs))
        for s in new:
            if s.params.max_tokens == 0 and not s.finished:
                self._finish(s, "length")  # only the prompt was asked for
        keep = [i for i, s in enumerate(new) if not s.finished]
        self._sample_and_accept([new[i] for i in keep], logits[keep])

    def _decode(self) -> None:
        """One token for every lane; a dead lane decodes a dummy token at position 0 of its own cache."""
        tokens = torch.tensor([s.gen[-1] if s is not None else 0 for s in self.lanes])
        positions = torch.tensor([len(s.prompt) + len(s.gen) - 1 if s is not None else 0 for s in self.lanes])
        logits = self.model.decode(tokens, positions, self.cache, self._plan)  # the plan of self._layout
        live = [i for i, s in enumerate(self.lanes) if s is not None]
        self._sample_and_accept([self.lanes[i] for i in live], logits if len(live) == len(self.lanes) else logits[live])

    def _sample_and_accept(self, rows: list[RequestState], logits: torch.Tensor) -> None:
        """logits (n, V) for `rows` -> one token each; then retire finished rows and compact the lanes.
        A row whose logits are not finite fails alone (NonFiniteError) and its KV lane is zeroed."""
        finite = finite_rows(logits)
        for s in (s for s, ok in zip(rows, finite) if not ok):
            self.cache.clear_lane(s.lane)
            self._finish(s, "error", NonFiniteError(
                f"the model's next-token scores for model {s.key!r} are NaN/Inf after {len(s.gen)} tokens (the "
                "adapter weights times the mix weights overflow); lower the mix weights or check the adapter"))
        keep = [i for i, ok in enumerate(finite) if ok]
        live = [rows[i] for i in keep]
        for s, (tok, e) in zip(live, sample_tokens(live, logits if len(keep) == len(rows) else logits[keep])):
            reason = s.accept(tok, e, eos_ids=self.codec.eos_ids, context=self.context, metrics=self.metrics)
            if reason is not None:
                self._finish(s, reason)
        self._retire()


    def _finish(self, s: RequestState, reason: str, error: LoraplexError | None = None) -> None:
        s.finish(reason, self.metrics, error)

    def _retire(self) -> None:
        """Free the lanes of finished requests (the plan stays: their rows run dead until reused)."""
        for i, s in enumerate(self.lanes):
            if s is not None and s.finished:
                self.lanes[i] = None
        if all(s is None for s in self.lanes):
            self.lanes, self._layout, self._plan = [], (), None

    # ---- the background thread and shutdown ---------------------------------------------------------------
    def start(self) -> None:
        """Run steps in a background thread until `shutdown`."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="loraplex-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self.lanes and not len(self._queue) and not self._stop:
                    self._cond.wait()
                if self._stop and not self.lanes and not len(self._queue):
                    return
            try:
                self.step()
            except BaseException as exc:  # fail every request loudly, then let the thread die with it
                self._fail_all(exc)
                raise

    def _fail_all(self, exc: BaseException) -> None:
        with self._cond:
            self.failed = exc
            self.accepting = False
            self._abort = True
        err = ShuttingDownError(f"the engine stopped after an internal error: {exc!r}")
        for s in list(self.running):
            self._finish(s, "error", err)
        with self._cond:
            for s in self._queue.remove_if(lambda s: True):
                self._finish(s, "error", err)
        self.lanes, self._layout, self._plan = [], (), None

    def shutdown(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; with drain, finish every queued and running one first (at most `timeout`
        seconds, after which the rest fail with ShuttingDownError)."""
        with self._cond:
            self.accepting = False
            self._stop = True
            if not drain:
                self._abort = True
            self._cond.notify_all()
        if self._thread is None:
            end = math.inf if timeout is None else time.monotonic() + timeout
            while (self.lanes or len(self._queue)) and time.monotonic() < end:
                self.step()
            if self.lanes or len(self._queue):
                self._abort = True
                self.step()
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            with self._cond:
                self._abort = True
                self._cond.notify_all()
            self._thread.join()

