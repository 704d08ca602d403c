"""Raw token logprobs: vLLM's default "raw" mode, log_softmax of the model's logits over the whole vocabulary,
taken before logit_bias, penalties and temperature (so they do not depend on the sampling values).

    token_logprobs(logits (n, V), tokens [n], k) -> [TokenLogprob(token, logprob, top k (id, logprob))] * n

The sampler that picks the tokens is runtime/sampling.py `sample_next`; the server reports these
(serve/engine.py, serve/protocol.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


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
