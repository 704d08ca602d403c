"""Batched generation over a MultiLoraModel: each row its own adapter, one KV cache, per-row sampling.

The loop, for prompts p_b (token lists) left-padded to length T:
    prefill  ids (B, T), mask (B, T) (0 on padding), position_ids = cumsum(mask) - 1 (clamped at 0)
             -> logits of the last position (B, V); the cache holds T positions per row
    decode   next token per row (B, 1); mask gets a column of ones; position_ids = previous + 1
Padding is masked out of attention and positions count real tokens only, so each row computes what it
would alone: greedy output is the same as running the request by itself (tested). That is the "hf" backend;
on a Llama-family base the default backend="auto" runs the same loop on the compact decoder the server runs
(prompts right-padded into KV lanes, `runtime.steps`), so generate and the server give the same tokens.

Sampling is runtime/sampling.py (`SamplingParams`, `sample_next`, the one sampler).

A row finishes on an end-of-sequence token (`stop_ids`; "stop"; not included in its tokens), when its decoded
text contains a stop string ("stop"; the text is cut before it), or after max_new_tokens ("length"). Finished
rows keep a place in the batch until every row is done (their extra tokens are discarded).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Union

import torch

from ..errors import ConfigError, ShapeMismatchError
from .sampling import SamplingParams, sample_next
from .steps import DecoderSteps, HFSteps, Steps, check_plan, pick_decoder

if TYPE_CHECKING:
    from .batch import RowSpec
    from .model import MultiLoraModel


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


def stop_ids(model: Any, tokenizer: Any = None, override: Union[int, Sequence[int], None] = None) -> frozenset[int]:
    """The end-of-sequence ids a generation stops on: the ONE rule of `generate`, the server (`TextCodec`) and
    evaluate. `override` (an id or ids) alone when given; else every eos_token_id found on, in this order,
    model.generation_config, model.config (`model` itself when it is a config) and the tokenizer, each an id,
    a list of ids or None. All of them, not the first found: a chat tokenizer's end of turn and the base's
    end of text both end a reply (vLLM's rule too). E.g. generation_config [2, 7], config 2, tokenizer 9
    -> {2, 7, 9}."""
    if override is not None:
        return _as_ids(override)
    sources = (getattr(model, "generation_config", None), getattr(model, "config", model), tokenizer)
    return frozenset().union(*(_as_ids(getattr(s, "eos_token_id", None)) for s in sources))


def _as_ids(value: Union[int, Sequence[int], None]) -> frozenset[int]:
    if value is None:
        return frozenset()
    return frozenset({int(value)} if isinstance(value, int) else (int(i) for i in value))


def pad_id(tokenizer: Any, stops: frozenset[int]) -> int:
    """The id `left_pad` fills with (masked, so it never changes a result): the tokenizer's pad_token_id, else
    the smallest stop id, else 0."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return pad if isinstance(pad, int) else min(stops, default=0)


def _per_row(value: Union[float, int, None, Sequence], B: int, what: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != B:
            raise ShapeMismatchError(f"{what} has {len(value)} entries for {B} prompts; give one or one per row")
        return list(value)
    return [value] * B


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
    backend: str = "auto",
) -> list[Generation]:
    """Generate for every prompt (a string, needing engine.tokenizer, or a token list) with its row's adapter.

    adapters[b]: a name, None (base only) or {name: weight}; None for all rows if omitted. temperature,
    top_p and seed take one value for all rows or one per row. eos_token_id overrides `stop_ids`'s
    ids (the model's generation config, config and tokenizer). backend: "auto" (the compact decoder when the
    base and the request allow it, else the HF model), "decoder" or "hf" (see `runtime.steps`). Returns one
    Generation per prompt, in order (see the module docstring).
    """
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
    device = engine.pool.device
    gens = [p.generator(device) for p in params]
    eos = stop_ids(engine.model, tok, eos_token_id)
    pad = pad_id(tok, eos)

    decoder = pick_decoder(engine, backend, max(len(s) for s in seqs), max_new_tokens)
    out: list[list[int]] = [[] for _ in range(B)]
    texts: list[Optional[str]] = [None] * B
    reason: list[Optional[str]] = [None] * B
    with engine.batch(rows) as batch:
        decoder = check_plan(batch, decoder, backend)
        steps: Steps = DecoderSteps(batch, decoder, seqs, pad, max_new_tokens) if decoder is not None else \
            HFSteps(batch, *left_pad(seqs, pad, device), engine.model)  # left_pad: (B, T) ids, (B, T) mask
        logits = steps.first()  # (B, V)
        for step in range(max_new_tokens):
            nxt = sample_next(logits, params, gens)  # (B,)
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
            logits = steps.next(nxt)
    results = []
    for b in range(B):
        r = reason[b] or "length"
        text = texts[b] if texts[b] is not None else (tok.decode(out[b], skip_special_tokens=True) if tok else None)
        results.append(Generation(out[b], text, r, len(seqs[b]), rows[b]))
    return results
