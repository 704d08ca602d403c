"""The one sampler of generate, the server and evaluate: one next token per batch row, each row its own values.

Per row b (`sample_next`), in vLLM's order:
  1. logits are adjusted (`adjust_logits`): + logit_bias[token]; repetition_penalty r on every token seen in
     the prompt or the output (l > 0 -> l / r, else l * r); - frequency_penalty * count_in_output[token];
     - presence_penalty * (count_in_output[token] > 0);
  2. temperature t_b < MIN_TEMPERATURE (0 included) -> argmax of the adjusted logits; otherwise
     softmax((l - max) / t_b), then keep the tokens with p >= min_p * p_max, then the top_k most likely (0 = all),
     renormalise, then the smallest set of most likely tokens whose mass reaches top_p (never fewer than
     the most likely one), drawn with row b's own generator (seeded with seed_b when given), so a seeded
     request samples the same tokens whatever batch it is in.
`SamplingParams` holds one row's values and refuses, when built, any value outside the bounds below, inside
which the math cannot overflow or divide by zero for finite logits (adjusted logits are clamped to float32's
finite range). Logprobs are not the sampler's business: the server reports log_softmax of the raw logits.

How (none of it changes the distribution above): rows with penalties are adjusted together; rows without
min_p, top_k or top_p < 1 are drawn together from softmax's numerator in vocabulary order; a top_k row from its
top_k (`topk`); the min_p / top_p rows together by a radix select that finds where the kept mass ends
(`_nucleus`), never sorting the vocabulary (~3 ms a row at V = 49152 on CPU). Every draw is an inverse CDF at
one uniform from the row's generator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import ConfigError

MIN_TEMPERATURE = 1e-4  # below it (0 included) a row decodes greedily: softmax(l / t) is argmax up to near-ties
MAX_TEMPERATURE = 100.0
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes
MAX_LOGPROBS = 20  # top alternatives a request may ask for per token (OpenAI's and vLLM's default limit)
MAX_LOGIT_BIAS = 1024  # entries in logit_bias
MAX_REPETITION_PENALTY = 100.0
RADIX = ((20, 11), (10, 10), (0, 10))  # (shift, width): `_nucleus` selects a float32's 31 value bits in 3 passes


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling values, checked when built (ConfigError says which bound failed).

    max_tokens >= 0 (0: the prompt is only read, for its prompt_logprobs); temperature in [0, 100]
    (< MIN_TEMPERATURE = greedy); top_p in (0, 1]; top_k >= -1 (0 and -1 = all); min_p in [0, 1];
    frequency_penalty, presence_penalty in [-2, 2]; repetition_penalty in (0, 100] (1 = none); logit_bias:
    at most 1024 (token id >= 0, bias in [-100, 100]) pairs (ids are checked against the vocabulary by
    whoever knows it); seed an int in SEED_RANGE or None; stop: at most 8 non-empty strings of up to 256
    characters; logprobs / prompt_logprobs: None or the number (0..20) of top alternatives to report per
    generated / prompt token.
    """

    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    top_k: int = 0
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        def number(v: object) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        def integer(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not integer(self.max_tokens) or self.max_tokens < 0:
            raise ConfigError(f"max_tokens must be an integer >= 0, got {_shown(self.max_tokens)}")
        if not (number(self.temperature) and 0 <= self.temperature <= MAX_TEMPERATURE):
            raise ConfigError(f"temperature must be a number in [0, {MAX_TEMPERATURE:g}] (0 = greedy), "
                              f"got {_shown(self.temperature)}")
        if not (number(self.top_p) and 0 < self.top_p <= 1):
            raise ConfigError(f"top_p must be a number in (0, 1], got {_shown(self.top_p)}")
        if not (integer(self.top_k) and self.top_k >= -1):
            raise ConfigError(f"top_k must be an integer >= -1 (0 or -1 = all tokens), got {_shown(self.top_k)}")
        if not (number(self.min_p) and 0 <= self.min_p <= 1):
            raise ConfigError(f"min_p must be a number in [0, 1], got {_shown(self.min_p)}")
        for k in ("frequency_penalty", "presence_penalty"):
            if not (number(getattr(self, k)) and -2 <= getattr(self, k) <= 2):
                raise ConfigError(f"{k} must be a number in [-2, 2], got {_shown(getattr(self, k))}")
        if not (number(self.repetition_penalty) and 0 < self.repetition_penalty <= MAX_REPETITION_PENALTY):
            raise ConfigError(f"repetition_penalty must be a number in (0, {MAX_REPETITION_PENALTY:g}] (1 = none), "
                              f"got {_shown(self.repetition_penalty)}")
        if not isinstance(self.logit_bias, tuple) or len(self.logit_bias) > MAX_LOGIT_BIAS or not all(
                isinstance(e, tuple) and len(e) == 2 and integer(e[0]) and e[0] >= 0 and number(e[1])
                and -100 <= e[1] <= 100 for e in self.logit_bias):
            raise ConfigError(f"logit_bias must map at most {MAX_LOGIT_BIAS} token ids (integers >= 0) to biases "
                              f"in [-100, 100], got {_shown(self.logit_bias)}")
        for k in ("logprobs", "prompt_logprobs"):
            v = getattr(self, k)
            if v is not None and not (integer(v) and 0 <= v <= MAX_LOGPROBS):
                raise ConfigError(f"{k} must be null or an integer in [0, {MAX_LOGPROBS}], got {_shown(v)}")
        if self.seed is not None and not (integer(self.seed) and SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]):
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

    @property
    def adjusts(self) -> bool:
        """Whether step 1 (logit_bias and penalties) changes anything."""
        return bool(self.logit_bias) or self.repetition_penalty != 1 or self.frequency_penalty != 0 or \
            self.presence_penalty != 0

    def generator(self, device: torch.device) -> Optional[torch.Generator]:
        """The row's own generator (seeded), or None (torch's global one) when unseeded or greedy."""
        return None if self.seed is None or self.greedy else torch.Generator(device).manual_seed(self.seed)


def _shown(v: object) -> str:
    """A value for an error message, kept short (Python will not print an int of over 4300 digits)."""
    if isinstance(v, int) and v.bit_length() > 128:
        return f"an integer of {v.bit_length()} bits"
    return repr(v)[:200]


def adjust_logits(logits: torch.Tensor, params: Sequence[SamplingParams],
                  contexts: Sequence[tuple[Sequence[int], Sequence[int]]]) -> torch.Tensor:
    """Step 1 of the module docstring for n rows at once: logits (n, V) float32, each row's SamplingParams and
    (prompt ids, output ids) -> adjusted (n, V), finite. A row's ids index its own part of the flattened logits."""
    n, V = logits.shape
    z = logits.clone()
    dev = z.device

    def flat_ids(rows: list[int], prompt: bool) -> torch.Tensor:  # the rows' output (and prompt) ids, offset by row
        parts = [torch.as_tensor([*contexts[j][0], *contexts[j][1]] if prompt else list(contexts[j][1]),
                                 dtype=torch.long, device=dev) + j * V for j in rows]
        return torch.cat(parts)

    bias = [(j * V + i, b) for j, p in enumerate(params) for i, b in p.logit_bias]
    if bias:
        z.view(-1).index_add_(0, torch.tensor([i for i, _ in bias], device=dev),
                              torch.tensor([b for _, b in bias], device=dev, dtype=z.dtype))
    rep = [j for j, p in enumerate(params) if p.repetition_penalty != 1]
    if rep:
        seen = torch.zeros(n, V, dtype=torch.bool, device=dev)
        seen.view(-1)[flat_ids(rep, prompt=True)] = True
        r = torch.tensor([p.repetition_penalty for p in params], device=dev, dtype=z.dtype)[:, None]  # (n, 1)
        z = torch.where(seen, torch.where(z > 0, z / r, z * r), z)
    pen = [j for j, p in enumerate(params) if (p.frequency_penalty or p.presence_penalty) and len(contexts[j][1])]
    if pen:
        counts = torch.bincount(flat_ids(pen, prompt=False), minlength=n * V).view(n, V).to(z.dtype)
        f, pr = torch.tensor([[p.frequency_penalty, p.presence_penalty] for p in params], device=dev,
                             dtype=z.dtype).T[:, :, None]  # (n, 1) each
        z = z - f * counts - pr * (counts > 0).to(z.dtype)
    big = torch.finfo(z.dtype).max
    return z.clamp(-big, big)


def _filters(p: SamplingParams, V: int) -> bool:
    """Whether step 2 drops any token for `p` beyond float rounding (min_p, a top_k under V, or top_p < 1)."""
    return p.min_p > 0 or 0 < p.top_k < V or p.top_p < 1


def _top_k(prob: torch.Tensor, p: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 2 for a row with 0 < top_k < V over its probabilities prob (V,): (weights (top_k,), token ids
    (top_k,)) of its top_k most likely tokens, most likely first, a dropped one with weight 0 (not renormalised)."""
    w, ids = prob.topk(p.top_k)  # (k,) descending
    keep = w >= p.min_p * w[0]
    keep[0] = True
    w = w * keep
    w = w / w.sum()  # min_p and top_k's survivors are renormalised before top_p
    inside = (w.cumsum(0) - w) < p.top_p  # the most likely tokens until their mass reaches top_p ...
    inside[0] = True  # ... and always the first (p rounds to 0 in float32 below ~1e-45)
    return w * inside, ids


def _nucleus(prob: torch.Tensor, min_p: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Step 2 without top_k for n rows at once, without sorting the vocabulary (a sort is ~3 ms a row at V = 49152
    on CPU): probabilities prob (n, V), min_p and top_p (n,) float64 -> the kept tokens' weights (n, V), 0 elsewhere
    (not renormalised).

    The tokens passing min_p (p >= min_p * p_max) are q; top_p keeps the most likely until their mass reaches
    top_p * mass(q), and always the first, i.e. every token above a value tau and, of the tokens equal to tau, as
    many as needed (the first in vocabulary order): the set sorting would keep. tau is the largest value v with
    mass(q >= v) >= that target. Non-negative float32 values order as their bit patterns, so tau is found a few
    bits at a time (RADIX, a radix select): a bincount of each row's mass per value of the next bits, over the
    tokens whose higher bits equal tau's so far, says which value tau's next bits take (float64 sums after the
    first pass, whose per-bucket sums are float32, as a sort's cumulative sum would be)."""
    n, V = prob.shape
    filtered = bool((min_p > 0).any())
    q = torch.where(prob >= min_p[:, None] * prob.amax(dim=-1, keepdim=True), prob, 0.0) if filtered else prob
    mass_q = torch.where(min_p > 0, q.sum(-1, dtype=torch.float64), 1.0) if filtered else torch.ones_like(top_p)
    target = (top_p * mass_q).clamp(min=torch.finfo(torch.float64).tiny)  # (n,) > 0: the first token always
    rows = torch.arange(n, device=q.device)
    bits = q.view(torch.int32)  # (n, V) >= 0: the order of the values
    prefix = torch.zeros(n, dtype=torch.long, device=q.device)  # tau's bits found so far
    above = torch.zeros(n, dtype=torch.float64, device=q.device)  # the mass of the values above the candidates
    r = i = None  # the candidates (row, token), once the first pass has narrowed them from every token
    for shift, width in RADIX:
        offset = (rows << width).to(torch.int32)
        if r is None:
            key = (bits >> shift) + offset[:, None]  # (n, V): the top bits need no mask
            mass = torch.bincount(key.flatten(), weights=q.flatten(), minlength=n << width).double()
        else:
            key = ((bits[r, i] >> shift) & ((1 << width) - 1)) + offset[r]
            mass = torch.bincount(key, weights=q[r, i].double(), minlength=n << width)
        mass = mass.view(n, 1 << width)
        suffix = mass.flip(-1).cumsum(-1).flip(-1) + above[:, None]  # mass of the values >= each key's
        d = ((suffix >= target[:, None]).sum(-1) - 1).clamp(min=0)  # (n,) the last key still reaching the target
        above = suffix[rows, d] - mass[rows, d]
        prefix = (prefix << width) | d
        want = d + (rows << width)  # (n,) each row's chosen key
        if r is None:
            r, i = (key == want[:, None]).nonzero(as_tuple=True)
        else:
            hit = key == want[r]
            r, i = r[hit], i[hit]
    tau = prefix.to(torch.int32).view(torch.float32)[:, None]  # (n, 1)
    need = torch.ceil((target - above) / tau[:, 0].double()).clamp(min=1)  # (n,) ties to keep, the first ones
    ties = torch.bincount(r, minlength=n)  # the candidates left are the tokens equal to tau
    kept = q >= tau
    if bool((ties > need).any()):  # keep only the first `need` of a row's ties
        eq = q == tau
        kept &= ~eq | (eq.cumsum(-1) <= need[:, None])
    kept |= (top_p >= 1)[:, None] & (q > 0)  # top_p 1: every token passing min_p
    return torch.where(kept, q, 0.0)


def _exp(z: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Adjusted logits z (n, V) and temperatures (n, 1) -> exp((z - max) / t) (n, V), softmax's numerator: every
    exponent is <= 0, so exp never overflows, and the top token has exp(0) = 1."""
    return (z - z.amax(dim=-1, keepdim=True)).div_(temperature).exp_()


def _filtered(e: torch.Tensor, params: Sequence[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Step 2 for rows e (n, V) = exp((z - max) / t) that all filter, all with top_k (n = 1) or all without:
    (weights (n, k), token ids (n, k) or None for (n, V) in vocabulary order), a dropped token with weight 0."""
    prob = e / e.sum(dim=-1, keepdim=True)
    V = e.shape[-1]
    if 0 < params[0].top_k < V:
        w, ids = _top_k(prob[0], params[0])
        return w[None], ids[None]
    t = torch.tensor([[p.min_p, p.top_p] for p in params], dtype=torch.float64, device=e.device)
    return _nucleus(prob, t[:, 0], t[:, 1]), None


def distribution(logits: torch.Tensor, p: SamplingParams, prompt: Sequence[int] = (),
                 output: Sequence[int] = ()) -> torch.Tensor:
    """The probabilities (V,) `sample_next` draws one row's token from (one-hot at the argmax when greedy)."""
    z = adjust_logits(logits.float()[None], [p], [(prompt, output)])[0] if p.adjusts else logits.float()
    if p.greedy:
        return torch.nn.functional.one_hot(z.argmax(), z.shape[0]).float()
    e = _exp(z[None], torch.tensor([[p.temperature]], device=z.device))  # (1, V)
    w, ids = _filtered(e, [p]) if _filters(p, z.shape[0]) else (e, None)
    w = w[0] / w[0].sum()
    return w if ids is None else torch.zeros_like(z).scatter(0, ids[0], w)


def _draw(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse CDF over weights w (n, k) >= 0, each row with some mass, at u (n,) uniform in [0, 1) -> the index
    (n,) of each row's drawn token; never a token of weight 0."""
    cdf = w.cumsum(-1)  # (n, k)
    total = cdf[:, -1:]
    at = torch.minimum(u[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))  # < total
    return torch.searchsorted(cdf, at, right=True)[:, 0]  # the first index whose cdf passes `at`


def sample_next(logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[Optional[torch.Generator]],
                contexts: Optional[Sequence[tuple[Sequence[int], Sequence[int]]]] = None) -> torch.Tensor:
    """One next token per row from finite logits (B, V) (see the module docstring). contexts[b] = (prompt ids,
    output ids so far) of row b, needed only by rows with penalties. Never divides by zero or overflows.
    Sampling rows are drawn in three groups: no filter, min_p / top_p (`_nucleus`), and each top_k row alone."""
    logits = logits.float()
    B, V = logits.shape
    argmax = any(p.greedy and not p.adjusts for p in params)
    out = logits.argmax(dim=-1) if argmax else torch.zeros(B, dtype=torch.long, device=logits.device)  # (B,)
    adjusted = [b for b, p in enumerate(params) if p.adjusts]
    z_rows: dict[int, torch.Tensor] = {}  # adjusted logits of the rows with penalties
    if adjusted:
        if contexts is None:
            raise ConfigError("penalties need each row's prompt and output ids: pass contexts")
        z_adj = adjust_logits(logits[adjusted], [params[b] for b in adjusted], [contexts[b] for b in adjusted])
        z_rows = dict(zip(adjusted, z_adj))
        for b in adjusted:
            if params[b].greedy:
                out[b] = z_rows[b].argmax()
    drawn = [b for b, p in enumerate(params) if not p.greedy]  # rows that sample
    if not drawn:
        return out
    z = logits if len(drawn) == B and not z_rows else logits[drawn]  # (n, V); _exp writes a new tensor
    for j, b in enumerate(drawn):
        if b in z_rows:
            z[j] = z_rows[b]
    e = _exp(z, torch.tensor([[params[b].temperature] for b in drawn], device=logits.device))
    # each row's uniform from its own generator, in row order, so a seeded row draws the same whatever its batch
    u = torch.cat([torch.rand(1, generator=generators[b], device=logits.device) for b in drawn])  # (n,)
    top_k = [j for j, b in enumerate(drawn) if 0 < params[b].top_k < V]
    filtered = [j for j, b in enumerate(drawn) if _filters(params[b], V) and j not in top_k]
    plain = [j for j, b in enumerate(drawn) if not _filters(params[b], V)]
    for g in [[j] for j in top_k] + [g for g in (filtered, plain) if g]:  # top_k rows one by one
        rows = e if len(g) == len(drawn) else e[g]
        w, ids = _filtered(rows, [params[drawn[j]] for j in g]) if g is not plain else (rows, None)
        pick = _draw(w, u[g])  # (len(g),)
        out[[drawn[j] for j in g]] = pick if ids is None else ids.gather(1, pick[:, None])[:, 0]
    return out
