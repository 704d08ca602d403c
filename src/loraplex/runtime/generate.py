"""Batched generation over a MultiLoraModel: each row its own adapter, one KV cache, per-row sampling.

The loop, for prompts p_b (token lists) left-padded to length T:
    prefill  ids (B, T), mask (B, T) (0 on padding), position_ids = cumsum(mask) - 1 (clamped at 0)
             -> logits of the last position (B, V); the cache holds T positions per row
    decode   next token per row (B, 1); mask gets a column of ones; position_ids = previous + 1
Padding is masked out of attention and positions count real tokens only, so each row computes what it
would alone: greedy output is the same as running the request by itself (tested).

Sampling per row b (`sample_next`, the one sampler of generate, the server and evaluate): temperature
t_b < MIN_TEMPERATURE (0 included) -> argmax; otherwise softmax((logits - max) / t_b), kept to the smallest
set of most likely tokens whose mass reaches top_p_b (never fewer than the most likely one), renormalised,
drawn with row b's own generator (seeded with seed_b when given), so a seeded request samples the same
tokens whatever batch it is in. `SamplingParams` holds one row's values and refuses, when built, any value
outside the bounds below, inside which the math cannot overflow or divide by zero for finite logits.

A row finishes on an end-of-sequence token ("stop"; not included in its tokens), when its decoded text
contains a stop string ("stop"; the text is cut before it), or after max_new_tokens ("length"). Finished
rows keep a place in the batch until every row is done (their extra tokens are discarded).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Union

import torch

from ..errors import ConfigError, ShapeMismatchError

if TYPE_CHECKING:
    from .model import MultiLoraModel, RowSpec


@dataclass
class Generation:
    """One row's result."""

    token_ids: list[int]  # generated tokens (without the prompt, without the end-of-sequence token)
    text: Optional[str]  # decoded token_ids (cut before a stop string); None without a tokenizer
    finish_reason: str  # "stop" (end of sequence or a stop string) or "length" (max_new_tokens reached)
    prompt_tokens: int  # length of the prompt in tokens
    adapter: Any = None  # what the row asked for (a name, None, or a {name: weight} mix)


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> ids (B, T) padded on the left with pad_id, and the attention mask (B, T) (1 = real)."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(seqs), T), dtype=torch.long, device=device)
    for b, s in enumerate(seqs):
        if len(s):
            ids[b, T - len(s):] = torch.as_tensor(list(s), dtype=torch.long, device=device)
            mask[b, T - len(s):] = 1
    return ids, mask


MIN_TEMPERATURE = 1e-4  # below it (0 included) a row decodes greedily: softmax(l / t) is argmax up to near-ties
MAX_TEMPERATURE = 100.0
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling values, checked when built (ConfigError says which bound failed).

    max_tokens >= 1; temperature 0 or in [0, 100] (< MIN_TEMPERATURE = greedy); top_p in (0, 1]; seed an int
    in SEED_RANGE or None; stop: at most 8 non-empty strings of up to 256 characters.
    """

    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        def number(v: object) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be an integer >= 1, got {_shown(self.max_tokens)}")
        if not (number(self.temperature) and 0 <= self.temperature <= MAX_TEMPERATURE):
            raise ConfigError(f"temperature must be a number in [0, {MAX_TEMPERATURE:g}] (0 = greedy), "
                              f"got {_shown(self.temperature)}")
        if not (number(self.top_p) and 0 < self.top_p <= 1):
            raise ConfigError(f"top_p must be a number in (0, 1], got {_shown(self.top_p)}")
        if self.seed is not None and not (isinstance(self.seed, int) and not isinstance(self.seed, bool)
                                          and SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]):
            raise ConfigError(f"seed must be an integer in [-2**63, 2**64 - 1] or null, got {_shown(self.seed)}")
        if isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.stop, tuple) or len(self.stop) > 8 or \
                not all(isinstance(s, str) and 0 < len(s) <= 256 for s in self.stop):
            raise ConfigError(f"stop must be a tuple of at most 8 non-empty strings of up to 256 characters, "
                              f"got {_shown(self.stop)}")
        if not isinstance(self.ignore_eos, bool):
            raise ConfigError(f"ignore_eos must be true or false, got {_shown(self.ignore_eos)}")

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    def generator(self, device: torch.device) -> Optional[torch.Generator]:
        """The row's own generator (seeded), or None (torch's global one) when unseeded or greedy."""
        return None if self.seed is None or self.greedy else torch.Generator(device).manual_seed(self.seed)


def _shown(v: object) -> str:
    """A value for an error message, kept short (Python will not print an int of over 4300 digits)."""
    if isinstance(v, int) and v.bit_length() > 128:
        return f"an integer of {v.bit_length()} bits"
    return repr(v)[:200]


def sample_next(logits: torch.Tensor, temperature: Sequence[float], top_p: Sequence[float],
                generators: Sequence[Optional[torch.Generator]]) -> torch.Tensor:
    """One next token per row from finite logits (B, V): greedy where temperature < MIN_TEMPERATURE, else
    top-p sampling. Never divides by zero or overflows: logits are shifted so the largest is 0 first."""
    logits = logits.float()
    out = logits.argmax(dim=-1)  # (B,)
    for b, (t, p) in enumerate(zip(temperature, top_p)):
        if t < MIN_TEMPERATURE:
            continue
        z = (logits[b] - logits[b].max()) / t  # (V,) <= 0: exp never overflows, the top token has exp(0) = 1
        sorted_p, order = torch.softmax(z, dim=-1).sort(descending=True)
        keep = (sorted_p.cumsum(0) - sorted_p) < p  # the most likely tokens until their mass reaches p ...
        keep[0] = True  # ... and always the first (p rounds to 0 in float32 below ~1e-45)
        sorted_p = sorted_p * keep
        u = torch.rand((), generator=generators[b], device=logits.device) * sorted_p.sum()
        i = int(torch.searchsorted(sorted_p.cumsum(0), u, right=True).clamp(max=int(keep.sum()) - 1))
        out[b] = order[i]
    return out


def _per_row(value: Union[float, int, None, Sequence], B: int, what: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != B:
            raise ShapeMismatchError(f"{what} has {len(value)} entries for {B} prompts; give one or one per row")
        return list(value)
    return [value] * B


def _eos_ids(engine: MultiLoraModel, eos_token_id: Union[int, Sequence[int], None]) -> set[int]:
    if eos_token_id is None:
        gc = getattr(engine.model, "generation_config", None)
        eos_token_id = getattr(gc, "eos_token_id", None)
        if eos_token_id is None:
            eos_token_id = getattr(getattr(engine.model, "config", None), "eos_token_id", None)
    if eos_token_id is None:
        return set()
    return {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(i) for i in eos_token_id}


@torch.inference_mode()
def generate(
    engine: MultiLoraModel,
    prompts: Sequence[Union[str, Sequence[int]]],
    adapters: Optional[Sequence[RowSpec]] = None,
    *,
    max_new_tokens: int = 32,
    temperature: Union[float, Sequence[float]] = 0.0,
    top_p: Union[float, Sequence[float]] = 1.0,
    stop: Union[str, Sequence[str], None] = None,
    seed: Union[int, Sequence[Optional[int]], None] = None,
    eos_token_id: Union[int, Sequence[int], None] = None,
) -> list[Generation]:
    """Generate for every prompt (a string, needing engine.tokenizer, or a token list) with its row's adapter.

    adapters[b]: a name, None (base only) or {name: weight}; None for all rows if omitted. temperature,
    top_p and seed take one value for all rows or one per row. eos_token_id defaults to the model's
    generation config. Returns one Generation per prompt, in order (see the module docstring).
    """
    from transformers import DynamicCache

    B = len(prompts)
    if B == 0:
        return []
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    rows = [None] * B if adapters is None else list(adapters)
    if len(rows) != B:
        raise ShapeMismatchError(f"adapters has {len(rows)} entries for {B} prompts; give one per prompt")
    tok = engine.tokenizer
    seqs = []
    for p in prompts:
        if isinstance(p, str):
            if tok is None:
                raise ConfigError("string prompts need a tokenizer: MultiLoraModel(..., tokenizer=tok), or pass token lists")
            seqs.append(tok.encode(p))
        else:
            seqs.append([int(t) for t in p])
    if any(len(s) == 0 for s in seqs):
        raise ShapeMismatchError("every prompt needs at least one token")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if stops and tok is None:
        raise ConfigError("stop strings need a tokenizer: MultiLoraModel(..., tokenizer=tok)")
    params = [SamplingParams(max_tokens=max_new_tokens, temperature=t, top_p=p, seed=s) for t, p, s in
              zip(_per_row(temperature, B, "temperature"), _per_row(top_p, B, "top_p"), _per_row(seed, B, "seed"))]
    temps, tops = [p.temperature for p in params], [p.top_p for p in params]
    device = engine.pool.device
    gens = [p.generator(device) for p in params]
    eos = _eos_ids(engine, eos_token_id)
    pad = next(iter(eos), 0) if getattr(tok, "pad_token_id", None) is None else tok.pad_token_id

    ids, mask = left_pad(seqs, pad, device)  # (B, T), (B, T)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T) positions of real tokens from 0
    cache = DynamicCache(config=getattr(engine.model, "config", None))
    out: list[list[int]] = [[] for _ in range(B)]
    texts: list[Optional[str]] = [None] * B
    reason: list[Optional[str]] = [None] * B
    with engine.batch(rows) as batch:
        logits = batch(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1]  # (B, V)
        for step in range(max_new_tokens):
            nxt = sample_next(logits, temps, tops, gens)  # (B,)
            for b, t in enumerate(nxt.tolist()):
                if reason[b] is not None:
                    continue
                if t in eos:
                    reason[b] = "stop"
                    continue
                out[b].append(t)
                if stops:
                    text = tok.decode(out[b], skip_special_tokens=True)
                    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
                    if cut >= 0:
                        texts[b], reason[b] = text[:cut], "stop"
            if step == max_new_tokens - 1 or all(r is not None for r in reason):
                break
            mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)  # (B, T + step)
            pos = pos[:, -1:] + 1  # (B, 1)
            logits = batch(input_ids=nxt.unsqueeze(1), attention_mask=mask, position_ids=pos,
                           past_key_values=cache, use_cache=True).logits[:, -1]
    results = []
    for b in range(B):
        r = reason[b] or "length"
        text = texts[b] if texts[b] is not None else (tok.decode(out[b], skip_special_tokens=True) if tok else None)
        results.append(Generation(out[b], text, r, len(seqs[b]), rows[b]))
    return results
