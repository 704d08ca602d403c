"""The obvious slow sampler: one row's next-token distribution written as plain Python loops over the
vocabulary, straight from the definitions (vLLM's order: logit_bias, repetition, frequency and presence
penalties, then temperature, min_p, top_k, top_p). The fast one is runtime.sampling.distribution."""

from __future__ import annotations

import math
from collections import Counter


def reference_distribution(logits: list[float], p, prompt: list[int], output: list[int]) -> list[float]:
    """logits (V floats), SamplingParams p, the row's prompt and output ids -> probabilities (V floats)."""
    z = list(logits)
    for tok, bias in p.logit_bias:
        z[tok] += bias
    seen = set(prompt) | set(output)
    counts = Counter(output)
    for t in range(len(z)):
        if t in seen and p.repetition_penalty != 1:
            z[t] = z[t] / p.repetition_penalty if z[t] > 0 else z[t] * p.repetition_penalty
        z[t] -= p.frequency_penalty * counts[t] + p.presence_penalty * (counts[t] > 0)
    if p.greedy:
        best = max(range(len(z)), key=lambda t: (z[t], -t))  # the first of equal maxima, as torch.argmax
        return [1.0 if t == best else 0.0 for t in range(len(z))]
    top = max(z)
    e = [math.exp((v - top) / p.temperature) for v in z]
    probs = [v / sum(e) for v in e]
    order = sorted(range(len(z)), key=lambda t: -probs[t])
    kept = [t for t in order if probs[t] >= p.min_p * probs[order[0]]]
    if p.top_k > 0:
        kept = kept[: p.top_k]
    total = sum(probs[t] for t in kept)
    chosen, mass = [], 0.0
    for t in kept:  # the most likely tokens until their (renormalised) mass reaches top_p
        if chosen and mass >= p.top_p:
            break
        chosen.append(t)
        mass += probs[t] / total
    norm = sum(probs[t] for t in chosen)
    return [probs[t] / norm if t in chosen else 0.0 for t in range(len(z))]
