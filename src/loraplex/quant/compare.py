"""What merging an adapter into a quantized base costs: each way measured against the full-precision merge.

For a base, an adapter and a probe batch of token ids (B, T), and for each quantization scheme:
    reference   fp32 base with the adapter merged:  logits R (B, T, V)
    variants    the quantized base without adapter ("base"), and with the adapter merged by
                (a) "requantize", (b) "from_original", or kept (c) "separate" (see quant/lora.py): logits L
    metrics     max |L - R|                                    over all positions and vocabulary entries
                KL(ref || variant) = mean_pos sum_v p_R log(p_R / p_L)   nats, softmax over the vocabulary
                perplexity = exp(mean_pos -log p_L[next probe token])    positions 0..T-2 of every row
                greedy agreement = mean_pos [argmax L == argmax R]
    effect lost (KL(variant) - KL(separate)) / (KL(base) - KL(separate)): 0 = as close to the reference as
                keeping the adapter on the fly, 1 = as far as dropping the adapter altogether.
The recommendation per scheme follows from the numbers: merge with the better of (a)/(b) when it loses at
most EFFECT_LOST_OK of the adapter's effect (a merged model runs no adapter matmul), else keep it separate.
One quantized copy per scheme serves every variant: merge, measure, unmerge (bit-exact) and go on.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError, DataError
from ..inject import disable_adapters
from ..merge import merge, unmerge
from ..report import format_table
from ..store import AdapterFile, load_adapter, read_adapter
from .linear import SCHEMES, quantize_model
from .lora import QuantizedMergeWarning, merge_quantized

EFFECT_LOST_OK = 0.10  # a merge may lose up to 10% of the adapter's effect and still be recommended
MERGES = ("requantize", "from_original")
LABELS = {
    "reference": "fp32 + adapter merged (reference)",
    "fp_base": "fp32 base, no adapter",
    "base": "quantized base, no adapter",
    "requantize": "(a) requantize: Q(deQ(Wq)+d)",
    "from_original": "(b) from_original: Q(W+d)",
    "separate": "(c) separate: on the fly",
}
_NAME = "compared"
PathLike = Union[str, os.PathLike]

# A few plain sentences for models with a tokenizer when no prompts are given (written for loraplex).
DEFAULT_PROBE_TEXTS = (
    "The library keeps one frozen base model in memory and applies small adapters on top of it.",
    "Quantization stores each weight in fewer bits, which saves memory but rounds every value a little.",
    "To make a cup of tea, boil fresh water, pour it over the leaves and wait three to five minutes.",
    "The train left the station at noon and reached the coast before the evening rain began.",
    "Question: what is the capital of France? Answer: the capital of France is Paris.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Small models answer quickly; larger ones usually answer better, and the trade-off depends on the task.",
    "She opened the window, listened to the birds for a while, and then went back to her book.",
    "A good error message says what was expected, what was found instead, and how to fix it.",
    "The recipe needs two eggs, a cup of flour, half a cup of milk and a pinch of salt.",
    "In the winter the lake freezes over, and children from the village skate on it every afternoon.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen inside the leaves of plants.",
    "User: Can you summarize this paragraph in one sentence?\nAssistant: Sure, here is a short summary.",
    "The meeting was moved to Thursday because half of the team was travelling on Tuesday.",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i, 'is even')",
    "Prices rose by three percent last year, mostly because energy and food became more expensive.",
    "He forgot his umbrella at the office and walked home through the rain, humming a song.",
    "The museum opens at nine in the morning and closes at six, except on Mondays.",
    "To reset the device, hold the power button for ten seconds until the light blinks twice.",
    "Most languages have words for colours, but they do not all divide the spectrum in the same places.",
    "The old bridge was closed for repairs, so the bus took a long detour through the hills.",
    "Water boils at one hundred degrees Celsius at sea level, and at a lower temperature on a mountain.",
    "User: What is two plus two?\nAssistant: Two plus two is four.",
    "The library closes early on Fridays, so students usually study in the cafe across the street.",
)


@dataclass(frozen=True)
class VariantMetrics:
    """One row of the comparison (see the module docstring for the definitions)."""

    scheme: str  # "fp32", or a quantization scheme: "int8", "nf4", "nf4+dq"
    variant: str  # a key of LABELS
    max_abs_dlogit: float  # max |logit - reference logit|
    kl: float  # mean KL(reference || variant) per position, nats
    perplexity: float  # on the probe's next tokens
    agreement: float  # share of positions whose greedy token equals the reference's, in [0, 1]
    effect_lost: Optional[float] = None  # quantized variants only; NaN when the adapter has no measurable effect


@dataclass
class MergeComparison:
    """All rows, and one recommendation sentence per scheme derived from them."""

    rows: list[VariantMetrics]
    recommendations: dict[str, str] = field(default_factory=dict)  # scheme -> sentence
    probe_shape: tuple[int, int] = (0, 0)  # (B, T) of the probe ids

    def get(self, scheme: str, variant: str) -> VariantMetrics:
        for row in self.rows:
            if row.scheme == scheme and row.variant == variant:
                return row
        raise KeyError(f"no row ({scheme!r}, {variant!r}); have {[(r.scheme, r.variant) for r in self.rows]}")

    def table(self) -> str:
        rows = [[
            r.scheme, LABELS[r.variant], f"{r.max_abs_dlogit:.4f}", f"{r.kl:.2e}", f"{r.perplexity:.3f}",
            f"{100 * r.agreement:.1f}%", "-" if r.effect_lost is None else f"{100 * r.effect_lost:.1f}%",
        ] for r in self.rows]  # fmt: skip
        headers = ["scheme", "variant", "max |dlogit|", "KL(ref||v)", "ppl", "greedy agree", "effect lost"]
        return format_table(rows, headers, align="llrrrrr")

    def __str__(self) -> str:
        b, t = self.probe_shape
        lines = [f"probe: {b} x {t} tokens; reference: the fp32 base with the adapter merged", self.table(), ""]
        lines += [f"recommendation: {s}" for s in self.recommendations.values()]
        return "\n".join(lines)


# -- probes ---------------------------------------------------------------------------------------------------
def probe_ids_from_texts(tokenizer: Any, texts: Sequence[str], seq_len: int = 64, max_rows: int = 8) -> torch.Tensor:
    """Token ids (B, seq_len): the texts tokenized, joined with the EOS token and cut into full rows
    (at most `max_rows`; a remainder shorter than a row is dropped unless it is all there is)."""
    if seq_len < 2:
        raise ConfigError(f"seq_len must be >= 2 to score next tokens, got {seq_len}")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DataError("no probe text: the prompts are empty")
    eos = getattr(tokenizer, "eos_token_id", None)
    flat: list[int] = []
    for text in texts:
        flat += tokenizer(text, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
    if len(flat) < seq_len:
        return torch.tensor([flat], dtype=torch.long)  # (1, len) when the texts are short
    rows = min(max_rows, len(flat) // seq_len)
    return torch.tensor(flat[: rows * seq_len], dtype=torch.long).view(rows, seq_len)


def random_probe_ids(vocab_size: int, rows: int = 4, seq_len: int = 32, seed: int = 0) -> torch.Tensor:
    """Uniform random ids (rows, seq_len), for models without a tokenizer (the tiny test models)."""
    return torch.randint(0, vocab_size, (rows, seq_len), generator=torch.Generator().manual_seed(seed))


# -- metrics --------------------------------------------------------------------------------------------------
@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids)
    return (out.logits if hasattr(out, "logits") else out).float()  # (B, T, V)


def _metrics(scheme: str, variant: str, logits: torch.Tensor, ref: torch.Tensor, ids: torch.Tensor) -> VariantMetrics:
    lv = F.log_softmax(logits.double(), dim=-1)  # (B, T, V)
    lr = F.log_softmax(ref.double(), dim=-1)
    kl = (lr.exp() * (lr - lv)).sum(-1).mean()  # mean over (B, T) of KL(ref || variant)
    nll = -lv[:, :-1].gather(-1, ids[:, 1:, None]).mean()  # next-token NLL, positions 0..T-2
    return VariantMetrics(
        scheme=scheme, variant=variant, max_abs_dlogit=float((logits - ref).abs().max()), kl=max(float(kl), 0.0),
        perplexity=math.exp(float(nll)), agreement=float((logits.argmax(-1) == ref.argmax(-1)).double().mean()),
    )


def _effect_lost(row: VariantMetrics, base: VariantMetrics, separate: VariantMetrics) -> float:
    span = base.kl - separate.kl
    return (row.kl - separate.kl) / span if span > 0 else math.nan


def _recommend(scheme: str, rows: dict[str, VariantMetrics]) -> str:
    """Merge with the better of (a)/(b) when it stays within EFFECT_LOST_OK of the adapter's effect of (c)'s
    KL, else keep the adapter separate; the sentence quotes the numbers it was decided on."""
    sep, bare = rows["separate"], rows["base"]
    best = min((rows[m] for m in MERGES), key=lambda r: r.kl)
    worst = max((rows[m] for m in MERGES), key=lambda r: r.kl)
    effect = bare.kl - sep.kl  # how much closer to the reference the adapter brings the quantized base
    kls = (f"KL to the fp32 merge: {best.variant} {best.kl:.2e}, {worst.variant} {worst.kl:.2e}, separate "
           f"{sep.kl:.2e}, no adapter {bare.kl:.2e}; greedy agreement {100 * best.agreement:.1f}% vs "
           f"{100 * sep.agreement:.1f}% separate")  # fmt: skip
    if best.kl <= sep.kl + EFFECT_LOST_OK * max(effect, 0.0):
        how = ("is no further from it than keeping the adapter separate" if best.kl <= sep.kl else
               f"loses {100 * (best.kl - sep.kl) / effect:.1f}% of the adapter's effect against keeping it separate "
               f"(limit {100 * EFFECT_LOST_OK:.0f}%)")  # fmt: skip
        return f"{scheme}: merge with {best.variant} — it {how}, and a merged model runs no adapter matmul ({kls})"
    why = ("the base's own rounding already outweighs the adapter's effect, and a merge adds a second rounding"
           if sep.kl > effect else f"even {best.variant} loses {100 * (best.kl - sep.kl) / effect:.0f}% of the "
           "adapter's effect")  # fmt: skip
    return f"{scheme}: keep the adapter separate — {why} ({kls})"


# -- a synthetic adapter of a chosen size ----------------------------------------------------------------------
@torch.no_grad()
def plant_random_adapter(
    model: nn.Module, name: str = "planted", *, r: int = 16, relative_norm: float = 0.05, seed: int = 0,
    target_modules: Union[str, list[str]] = "all-linear",
) -> list[str]:
    """Inject adapter `name` with A and B both random (B non-zero), then rescale B per layer so that
    ||scale * B @ A||_F = relative_norm * ||W||_F: an adapter that visibly changes the model, for measuring
    merges without training one. Returns the targeted module names. Mutates `model` (like inject)."""
    from ..config import LoraConfig
    from ..inject import inject, lora_layers

    if relative_norm <= 0:
        raise ConfigError(f"relative_norm must be > 0, got {relative_norm}")
    config = LoraConfig(r=r, lora_alpha=r, target_modules=target_modules, init_lora_weights=False)
    targets = inject(model, config, name, seed=seed)
    for _, layer in lora_layers(model):
        if name in layer.r:
            w = layer.get_base_weight().float()
            d = layer.delta(name).float()
            layer.adapter_tensors(name)[1].mul_(relative_norm * torch.linalg.norm(w) / torch.linalg.norm(d))
    return targets


# -- the comparison -------------------------------------------------------------------------------------------
def _scheme_spec(scheme: str, double_quant: bool) -> tuple[str, str, bool]:
    """(label, scheme, double_quant) for "int8" / "nf4" / "nf4+dq"."""
    name, _, extra = scheme.partition("+")
    if name not in SCHEMES or extra not in ("", "dq") or (extra and name != "nf4"):
        raise ConfigError(f"scheme must be one of {SCHEMES} or 'nf4+dq', got {scheme!r}")
    dq = bool(extra) or (double_quant and name == "nf4")
    return (f"{name}+dq" if dq else name), name, dq


def compare_merge_strategies(
    base: Union[nn.Module, Callable[[], nn.Module]],
    adapter: Union[PathLike, AdapterFile],
    probe_ids: torch.Tensor,
    schemes: Sequence[str] = ("int8", "nf4"),
    *,
    double_quant: bool = False,
    block_size: int = 64,
    skip: tuple[str, ...] = ("lm_head",),
    check_base_model: bool = True,
) -> MergeComparison:
    """Measure every way of merging `adapter` into a quantized `base` against the fp32 merge (module docstring).

    base: a float model (deep-copied per scheme, never modified) or a factory returning a fresh one.
    adapter: an adapter directory or a read AdapterFile.  probe_ids: (B, T) token ids, T >= 2.
    schemes: "int8", "nf4", or "nf4+dq" (double quantization; `double_quant=True` turns it on for "nf4").
    """
    make = (lambda: copy.deepcopy(base)) if isinstance(base, nn.Module) else base
    if probe_ids.dim() != 2 or probe_ids.shape[1] < 2:
        raise ConfigError(f"probe_ids must be (B, T) token ids with T >= 2, got shape {tuple(probe_ids.shape)}")
    specs = [_scheme_spec(s, double_quant) for s in schemes]
    af = adapter if isinstance(adapter, AdapterFile) else read_adapter(adapter)
    ids = probe_ids.long()

    model = make()
    fp_base = _logits(model, ids)
    load_adapter(model, af, _NAME, check_base_model=check_base_model)
    merge(model, _NAME)
    ref = _logits(model, ids)  # (B, T, V)
    del model
    rows = [_metrics("fp32", "reference", ref, ref, ids), _metrics("fp32", "fp_base", fp_base, ref, ids)]
    result = MergeComparison(rows, probe_shape=(ids.shape[0], ids.shape[1]))

    for label, scheme, dq in specs:
        model = make()
        quantize_model(model, scheme, skip=skip, block_size=block_size, double_quant=dq, keep_original=True)
        load_adapter(model, af, _NAME, check_base_model=False)  # checked on the float base above; same weights
        got: dict[str, VariantMetrics] = {}
        with disable_adapters(model):
            got["base"] = _metrics(label, "base", _logits(model, ids), ref, ids)
        for strategy in MERGES:
            with warnings.catch_warnings():  # the comparison is what the warning asks for
                warnings.simplefilter("ignore", QuantizedMergeWarning)
                merge_quantized(model, _NAME, strategy=strategy)
            got[strategy] = _metrics(label, strategy, _logits(model, ids), ref, ids)
            unmerge(model, _NAME)
        got["separate"] = _metrics(label, "separate", _logits(model, ids), ref, ids)
        del model
        for key in ("base", "requantize", "from_original", "separate"):
            row = got[key]
            got[key] = replace(row, effect_lost=_effect_lost(row, got["base"], got["separate"]))
            result.rows.append(got[key])
        result.recommendations[label] = _recommend(label, got)
    return result


__all__ = [
    "DEFAULT_PROBE_TEXTS", "EFFECT_LOST_OK", "MergeComparison", "VariantMetrics", "compare_merge_strategies",
    "plant_random_adapter", "probe_ids_from_texts", "random_probe_ids",
]
