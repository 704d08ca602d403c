"""Evaluate the base and many adapters on held-out data in ONE pass over the base: every batch holds each of its
examples once per variant (the base and every adapter), rows routed with `inject.route_rows`.

Batch layout, with V = len(variants) (base first when included) and b examples per batch:
    row k * V + j  =  example k of the batch, run with variant j          input_ids (b * V, T)
Per variant, over the completion tokens (label != -100; token t + 1 is predicted at position t):
    loss         = sum of cross-entropy / number of target tokens           token-weighted mean, nats
    perplexity   = exp(loss)
    accuracy     = share of target tokens where argmax(logits) == the target  (next-token accuracy)
    exact_match  = share of examples whose greedy reply equals the reference reply, where
                   reference = the first contiguous run of target tokens (the completion, or the first
                               assistant turn), cut before its first stop token (`runtime.generate.stop_ids`);
                   reply     = greedy tokens after the prompt (everything before the reference), cut likewise;
                   both are decoded without special tokens and normalized: whitespace runs -> one space,
                   stripped, casefolded. Without a tokenizer the token ids are compared. Generation stops at a
                   stop token or after min(max_new_tokens, len(reference) + GENERATION_SLACK) tokens; a reply
                   still running then counts as a miss. Examples with nothing before their first target
                   token (plain text records without BOS) have no prompt and are not scored.
"""

from __future__ import annotations

import inspect
import math
import os
import re
from collections.abc import Mapping, Sequence, Set as AbstractSet
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import AdapterFileError, ConfigError, DataError
from ..inject import check_name, lora_layers, remove_adapter, route_rows
from ..layers import LoraLayer
from ..models import base_name, load_base
from ..runtime.generate import left_pad, pad_id, stop_ids
from ..runtime.store import AdapterStore
from ..store import CONFIG_NAME, AdapterFile, load_adapter, read_adapter
from ..train.config import INT_LIMIT, check_numbers
from ..train.data import IGNORE_INDEX, Batcher, Example, split, tokenize
from ..train.loss import FAST_LOSS_TYPES
from ..train.sources import Record, load_records
from .results import BASE, DEFAULT_METRICS, METRICS, EvalResult, PathLike

GENERATION_SLACK = 8  # extra greedy tokens allowed beyond the reference's length
# evaluate's numeric arguments (= eval's flags) for train.config.check_numbers: (kind, None allowed, meaning, check)
NUMERIC_ARGS = {
    "batch_size": (int, False, f"an int in [1, {INT_LIMIT}]", lambda v: 1 <= v <= INT_LIMIT),
    "max_length": (int, False, f"an int in [1, {INT_LIMIT}]", lambda v: 1 <= v <= INT_LIMIT),
    "max_new_tokens": (int, False, f"an int in [1, {INT_LIMIT}]", lambda v: 1 <= v <= INT_LIMIT),
    "limit": (int, True, f"an int in [1, {INT_LIMIT}]", lambda v: 1 <= v <= INT_LIMIT),
    "eval_split": (float, True, "a number in (0, 1)", lambda v: 0 < v < 1),
    "seed": (int, False, f"an int in [0, {INT_LIMIT}]", lambda v: 0 <= v <= INT_LIMIT),
}
AdapterSpec = Union[PathLike, Sequence[PathLike], Mapping[str, Union[PathLike, AdapterFile]]]


# -- inputs ---------------------------------------------------------------------------------------------------
def discover_adapters(spec: AdapterSpec) -> dict[str, Union[Path, AdapterFile]]:
    """{name: adapter directory} from: a mapping name -> dir; an adapter directory (named after it); a folder
    whose subdirectories are adapters (e.g. `train --out-per-data` output; hidden '.*' ones are skipped); a
    comma-separated string or a list of such, where an item may be `name=dir`."""
    if isinstance(spec, Mapping):
        return {check_name(str(k)): (v if isinstance(v, AdapterFile) else Path(v)) for k, v in spec.items()}
    items = ([s for s in str(spec).split(",") if s] if isinstance(spec, (str, os.PathLike)) else list(spec))
    found: dict[str, Union[Path, AdapterFile]] = {}
    for item in items:
        name, sep, path = str(item).partition("=")
        if sep and not Path(str(item)).exists():
            pairs = {check_name(name): Path(path)}
        else:
            pairs = _folder(Path(str(item)))
        for n, p in pairs.items():
            if n in found:
                raise ConfigError(f"two adapters are named {n!r} ({found[n]} and {p}); name them: NAME=DIR")
            found[n] = p
    return found


def _folder(path: Path) -> dict[str, Path]:
    if (path / CONFIG_NAME).is_file():
        return {_name_of(path): path}
    subs = [path / n for n in AdapterStore(path).names()] if path.is_dir() else []  # the store's folder rule
    if not subs:
        raise AdapterFileError(f"{str(path)!r} is neither an adapter directory (with {CONFIG_NAME}) nor a folder of "
                               "adapter directories; give adapter directories, or NAME=DIR pairs")
    return {_name_of(p): p for p in subs}


def _name_of(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", path.resolve().name)[:64] or "adapter"


def load_examples(data: Union[str, Sequence[str]], tokenizer: Any, *, max_length: int,
                  eval_split: Optional[float] = None, seed: int = 0, limit: Optional[int] = None,
                  skip_bad: bool = False) -> list[Example]:
    """Records of the sources (train's formats), tokenized; with `eval_split` only the held-out part of
    train.data.split(examples, eval_split, seed) (the split `loraplex train` made with the same values);
    then the first `limit`."""
    if tokenizer is None:
        raise ConfigError("evaluating records needs a tokenizer; this base has none (pass tokenized Examples, or "
                          "a base directory that holds a tokenizer)")
    examples: list[Example] = []
    for source in [data] if isinstance(data, str) else data:
        examples += tokenize(load_records(source, skip_bad=skip_bad), tokenizer, max_length=max_length)
    if eval_split is not None:
        examples = split(examples, eval_split, seed)[1]
    return examples[:limit] if limit is not None else examples


# -- the one pass -----------------------------------------------------------------------------------------------
def evaluate(model: Union[nn.Module, str], tokenizer: Any, adapters: AdapterSpec,
             data: Union[str, Sequence[str], Sequence[Record], Sequence[Example]], *,
             metrics: Sequence[str] = DEFAULT_METRICS, batch_size: int = 4, max_length: int = 512,
             include_base: bool = True, max_new_tokens: int = 64, limit: Optional[int] = None,
             eval_split: Optional[float] = None, seed: int = 0, progress: Optional[bool] = None,
             check_base_model: bool = True) -> EvalResult:
    """Score the base and every adapter on `data` (module docstring). `model`: a bare base (the adapters are
    loaded onto it for the pass and removed afterwards, so it ends as it started) or a load_base spec.
    `data`: sources / Records (tokenized with `tokenizer`, `max_length`) or tokenized Examples.
    `batch_size` = examples per forward; each becomes one row per variant."""
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise ConfigError(f"unknown metric(s) {bad or metrics}; choose from {list(METRICS)}")
    check_numbers("evaluate", {"batch_size": batch_size, "max_length": max_length, "max_new_tokens": max_new_tokens,
                               "limit": limit, "eval_split": eval_split, "seed": seed}, NUMERIC_ARGS)
    if isinstance(model, (str, os.PathLike)):
        model, own_tok = load_base(model)
        tokenizer = tokenizer if tokenizer is not None else own_tok
    if model.training:
        raise ConfigError("the model is in training mode (dropout on); call model.eval() first")
    if any(True for _ in lora_layers(model)):
        raise ConfigError("evaluate needs the bare base model, but this one already carries LoRA layers")
    found = discover_adapters(adapters)
    if include_base and BASE in found:
        raise ConfigError(f"an adapter is named {BASE!r}, which names the bare base in results; rename it (NAME=DIR)")
    examples = _examples(data, tokenizer, max_length, eval_split, seed, limit)
    files = {n: p if isinstance(p, AdapterFile) else read_adapter(p) for n, p in found.items()}
    loaded: list[str] = []
    try:
        for name, af in files.items():
            load_adapter(model, af, name, activate=False, check_base_model=check_base_model)
            loaded.append(name)
        variants: list[Optional[str]] = ([None] if include_base else []) + list(files)
        scores, tokens, generated = _run(model, tokenizer, variants, examples, list(metrics), batch_size,
                                         max_new_tokens, progress)
    finally:
        for name in loaded:
            remove_adapter(model, name)
    source = data if isinstance(data, str) else (", ".join(data) if data and isinstance(data[0], str) else
                                                  f"{len(examples)} examples")
    info = {n: {"path": str(af.path), "content_hash": af.content_hash, "r": af.config.r,
                "lora_alpha": af.config.lora_alpha, "bytes": af.nbytes} for n, af in files.items()}
    return EvalResult(base_name(model), str(source), list(metrics), scores, info, len(examples), tokens, generated)


def _examples(data, tokenizer, max_length, eval_split, seed, limit) -> list[Example]:
    if isinstance(data, str) or (data and isinstance(data[0], str)):
        examples = load_examples(data, tokenizer, max_length=max_length, eval_split=eval_split, seed=seed,
                                 limit=limit)
    elif data and isinstance(data[0], Record):
        examples = list(tokenize(data, tokenizer, max_length=max_length))
        examples = split(examples, eval_split, seed)[1] if eval_split is not None else examples
    else:
        examples = list(data)[:limit] if limit is not None else list(data)
    if not examples:
        raise DataError("no example to evaluate on (empty data, or every record was dropped)")
    return examples


@torch.no_grad()
def _run(model, tokenizer, variants, examples, metrics, batch_size, max_new_tokens, progress):
    from tqdm.auto import tqdm

    v = len(variants)
    names = [BASE if x is None else x for x in variants]
    want_tokens = any(m != "exact_match" for m in metrics)
    prompted = [e for e in examples if _first_target(e) > 0] if "exact_match" in metrics else []
    stops = stop_ids(model, tokenizer)
    pad = pad_id(tokenizer, stops)
    n_batches = (math.ceil(len(examples) / batch_size) if want_tokens else 0) + math.ceil(len(prompted) / batch_size)
    stats = torch.zeros(v, 3, dtype=torch.float64)  # per variant: loss sum, correct, target tokens
    hits = torch.zeros(v, dtype=torch.float64)
    disable = None if progress is None else not progress  # None: tqdm shows the bar on a terminal only
    with tqdm(total=n_batches, desc=f"eval {v} variants", unit="batch", disable=disable) as bar:
        if want_tokens:
            for batch in Batcher(examples, batch_size, seed=0, shuffle=False, pad_id=pad):
                rows = {k: t.repeat_interleave(v, 0) for k, t in batch.items()}  # (b * V, T)
                with route_rows(model, variants * batch["input_ids"].shape[0]):
                    per_row = _token_stats(model, rows)  # (b * V, 3)
                stats += per_row.view(-1, v, 3).sum(0)
                bar.update()
        for k in range(0, len(prompted), batch_size):
            chunk = prompted[k:k + batch_size]
            budgets = [min(max_new_tokens, len(_reference(e, stops)) + GENERATION_SLACK) for e in chunk]
            replies = _greedy(model, [e for e in chunk for _ in variants], variants * len(chunk), pad, stops,
                              [b for b in budgets for _ in variants])
            for i, e in enumerate(chunk):
                want = _normalize(_reference(e, stops), tokenizer)
                for j in range(v):
                    hits[j] += float(_normalize(_cut(replies[i * v + j], stops), tokenizer) == want)
            bar.update()
    scores: dict[str, dict[str, float]] = {}
    for j, name in enumerate(names):
        loss_sum, correct, count = stats[j].tolist()
        loss = loss_sum / count if count else math.nan
        values = {"loss": loss, "perplexity": math.exp(loss) if count else math.nan,
                  "accuracy": correct / count if count else math.nan,
                  "exact_match": float(hits[j]) / len(prompted) if prompted else math.nan}
        scores[name] = {m: values[m] for m in metrics}
    return scores, int(stats[0, 2]) if v else 0, len(prompted)


def _token_stats(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per row: [sum of cross-entropy, correct argmax predictions, target tokens] over label != -100: (R, 3)."""
    device = next(model.parameters()).device
    batch = {k: t.to(device) for k, t in batch.items()}
    labels = batch["labels"][:, 1:]  # (R, T-1): targets of positions 0 .. T-2
    mask = labels != IGNORE_INDEX
    inputs = {k: t for k, t in batch.items() if k != "labels"}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    fast = getattr(getattr(model, "config", None), "model_type", None) in FAST_LOSS_TYPES and head is not None \
        and not isinstance(head, LoraLayer)  # a routed head needs whole rows (routing is by batch row)
    if fast:  # the output head runs on the N target positions only, never building (R, T, vocab)
        hidden = model.get_decoder()(**inputs, use_cache=False).last_hidden_state  # (R, T, H)
        logits = head(hidden[:, :-1][mask])  # (N, V)
    else:
        logits = model(**inputs, use_cache=False).logits[:, :-1][mask]  # (N, V)
    targets = labels[mask]  # (N,)
    ce = F.cross_entropy(logits.float(), targets, reduction="none")  # (N,)
    correct = (logits.argmax(-1) == targets).double()
    rows = mask.nonzero()[:, 0]  # (N,) row of each target, row-major like the mask
    out = torch.zeros(labels.shape[0], 3, dtype=torch.float64, device=device)
    out[:, 0].index_add_(0, rows, ce.double())
    out[:, 1].index_add_(0, rows, correct)
    out[:, 2] = mask.sum(1).double()
    return out.cpu()


# -- exact match ------------------------------------------------------------------------------------------------
def _first_target(e: Example) -> int:
    return next(i for i, label in enumerate(e.labels) if label != IGNORE_INDEX)


def _reference(e: Example, stops: AbstractSet[int]) -> list[int]:
    start = _first_target(e)
    end = next((i for i in range(start, len(e.labels)) if e.labels[i] == IGNORE_INDEX), len(e.labels))
    return _cut(e.labels[start:end], stops)


def _cut(ids: list[int], stops: AbstractSet[int]) -> list[int]:
    return next((ids[:i] for i, t in enumerate(ids) if t in stops), ids)


def _normalize(ids: list[int], tokenizer: Any) -> Union[str, tuple[int, ...]]:
    if tokenizer is None:
        return tuple(ids)
    return " ".join(tokenizer.decode(ids, skip_special_tokens=True).split()).casefold()


def _greedy(model: nn.Module, examples: list[Example], variants: list[Optional[str]], pad: int, stops: AbstractSet[int],
            budgets: list[int]) -> list[list[int]]:
    """Greedy continuation of each example's prompt (row r routed to variants[r]), no KV cache: every step
    re-runs the left-padded batch, position_ids counted over real tokens only. A row stops at a stop token
    (kept) or after budgets[r] tokens. Returns the new ids per row."""
    prompts = [e.input_ids[:_first_target(e)] for e in examples]
    ids, mask = left_pad(prompts, pad, next(model.parameters()).device)  # (R, T)
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    replies: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    with route_rows(model, variants):
        for step in range(max(budgets)):
            positions = (mask.cumsum(-1) - 1).clamp_min(0)  # (R, T)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                           **last_only).logits  # (R, 1 or T, V)
            nxt = logits[:, -1].argmax(-1)  # (R,)
            for r, t in enumerate(nxt.tolist()):
                if not done[r]:
                    replies[r].append(t)
                    done[r] = t in stops or len(replies[r]) >= budgets[r]
            if all(done):
                break
            ids = torch.cat([ids, nxt[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return replies
