"""Promote one adapter to a deployable model: merge it into the base, check parity on the written directory,
and write a model card beside the weights.

    out/  config.json  model.safetensors  generation_config.json  tokenizer files (when the base has them)
          loraplex_merge.json   what export_merged merged (adapter path, content hash, weight)
          loraplex_promote.json  this report (adapter, base, eval metrics, training facts, parity row)
          MODEL_CARD.md          the same for people

Parity: the reference is the fp32 base with the adapter applied on the fly; the candidate is `out` loaded back
with plain `AutoModelForCausalLM.from_pretrained` (no loraplex), on verify's probe set, judged by
`verify.tolerance_for(dtype of its logits)`. Nothing is written to `out` unless the check passes: the whole
directory is staged beside it and renamed into place at the end (an existing `out` only with overwrite).
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch.nn as nn

from .. import __version__
from ..errors import AdapterNotFoundError, ConfigError, ParityError
from .evaluate import BASE, METRICS, AdapterSpec, EvalResult, discover_adapters
from .export import DTYPES, export_merged, parse_dtype
from ..inject import lora_layers, remove_adapter
from ..models import base_name, load_base
from .probes import Reference, at_positions, make_probes, run_logits
from ..outputs import PathLike, atomic_directory, check_output, write_json
from ..store import CONFIG_NAME, AdapterFile, load_adapter, read_adapter
from .verify import Row, VerifyReport, judge, tolerance_for

CARD_NAME = "MODEL_CARD.md"
REPORT_NAME = "loraplex_promote.json"
TRAIN_SUMMARY = "train_summary.json"


@dataclass
class PromoteReport:
    """What `promote` wrote and checked. `parity` is the judged row (verify.Row as a dict)."""

    name: str
    out: str
    base: str
    adapter_path: str
    content_hash: str
    dtype: str
    parity: dict[str, Any]
    probes: str
    metrics: Optional[dict[str, Any]] = None  # {"data", "examples", "rank", "of", "adapter": {...}, "base": {...}}
    training: Optional[dict[str, Any]] = None  # facts from train_summary.json, when found
    loraplex_version: str = __version__
    created: str = field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc)
                         .isoformat(timespec="seconds"))

    @property
    def passed(self) -> bool:
        return self.parity.get("status") == "PASS"


def promote(name: str, base: Union[str, PathLike, nn.Module], adapters: AdapterSpec, out: PathLike, *,
            eval_results: Union[EvalResult, PathLike, Mapping[str, Any], None] = None, dtype: str = "fp32",
            tokenizer: Any = None, num_layers: Optional[int] = None, prompts: Optional[Sequence[str]] = None,
            check_base_model: bool = True, overwrite: bool = False) -> PromoteReport:
    """Merge adapter `name` into `base` and write the deployable directory `out` (module docstring).

    `adapters`: an adapter directory, a folder of them, or anything evaluate.discover_adapters takes.
    `name="best"` picks the leaderboard winner of `eval_results` (by loss; the base is never picked).
    `eval_results` (an EvalResult, a results JSON path, or its dict) supplies the card's metrics; its content
    hash for `name` must match the adapter on disk. A `base` model is copied, never changed.
    An existing non-empty `out` is replaced (atomically) only with `overwrite`; never the adapter or the base.
    Raises ParityError (and writes nothing) when the merged directory fails the parity check."""
    parse_dtype(dtype)
    results = _results(eval_results)
    if name == "best":
        if results is None:
            raise ConfigError("NAME 'best' needs eval results (--results results.json from `loraplex eval`)")
        name = results.best()
    af = _pick(name, adapters)
    inputs = [af.path] + ([base] if isinstance(base, (str, os.PathLike)) and Path(base).exists() else [])
    check_output(out, overwrite=overwrite, inputs=inputs)  # before the work; atomic_directory checks again
    if results is not None and name in results.adapters:
        recorded = results.adapters[name].get("content_hash")
        if recorded != af.content_hash:
            raise ConfigError(f"the eval results score adapter {name!r} with content {str(recorded)[:12]}, but "
                              f"{af.path} holds {af.content_hash[:12]}: evaluate it again, or pass the right folder")
    model, tok = _base(base, tokenizer, num_layers)
    vocab = model.get_output_embeddings().weight.shape[0]
    probes = make_probes(tok, prompts, vocab_size=vocab)
    load_adapter(model, af, "promote", check_base_model=check_base_model)
    reference = at_positions(run_logits(model, probes), probes.attention_mask).float()  # (P, V)
    remove_adapter(model, "promote")
    report = PromoteReport(name, str(out), base_name(model), str(af.path), af.content_hash, dtype, {}, probes.source,
                           _metrics(results, name), _training(af.path))
    with atomic_directory(out, overwrite=overwrite, inputs=inputs) as tmp:
        export_merged(model, tok, [af], tmp / "merged", dtype=dtype, check_base_model=check_base_model)
        staged = tmp / "merged"
        for f in staged.iterdir():
            os.replace(f, tmp / f.name)
        staged.rmdir()
        row = parity(tmp, Reference.from_logits(reference), probes)
        report.parity = asdict(row)
        if row.status != "PASS":
            table = VerifyReport(report.base, report.adapter_path, [row]).table()
            raise ParityError(f"the merged model does not match base + adapter on the fly; nothing written to "
                              f"{out}:\n{table}")
        write_json(tmp / REPORT_NAME, asdict(report))
        (tmp / CARD_NAME).write_text(model_card(report), encoding="utf-8")
    return report


def parity(directory: PathLike, reference: Reference, probes) -> Row:
    """Judge the transformers model in `directory` (loaded with plain from_pretrained) against `reference`
    logits at the probe positions, with verify's tolerance for the dtype it computes in."""
    from transformers import AutoModelForCausalLM

    deployed = AutoModelForCausalLM.from_pretrained(directory).eval()
    logits = run_logits(deployed, probes)  # (N, T, V) in the dtype the deployed model computes in
    dname = next((k for k, v in DTYPES.items() if v == logits.dtype), str(logits.dtype))
    row = judge(Row("deployed", dname, "FAIL", True), reference, logits, probes.attention_mask,
                tolerance_for(logits.dtype))
    row.note = f"{int(probes.attention_mask.sum())} positions"
    return row


# -- inputs ----------------------------------------------------------------------------------------------------
def _results(value) -> Optional[EvalResult]:
    if value is None or isinstance(value, EvalResult):
        return value
    if isinstance(value, Mapping):
        return EvalResult.from_dict(value)
    return EvalResult.load(value)


def _pick(name: str, adapters: AdapterSpec) -> AdapterFile:
    found = discover_adapters(adapters)
    if name in found:
        src = found[name]
    elif len(found) == 1 and isinstance(adapters, (str, os.PathLike)) and (Path(adapters) / CONFIG_NAME).is_file():
        src = next(iter(found.values()))  # one adapter directory given: NAME only labels it
    else:
        raise AdapterNotFoundError(f"no adapter {name!r} among {sorted(found)}; pass its directory or the folder "
                                   "holding it")
    return src if isinstance(src, AdapterFile) else read_adapter(src)


def _base(base, tokenizer, num_layers):
    if isinstance(base, nn.Module):
        if any(True for _ in lora_layers(base)):
            raise ConfigError("promote needs the bare base model, but this one carries LoRA layers")
        return copy.deepcopy(base).float().eval(), tokenizer
    model, tok = load_base(base, num_layers=num_layers)
    return model, tokenizer if tokenizer is not None else tok


def _metrics(results: Optional[EvalResult], name: str) -> Optional[dict[str, Any]]:
    if results is None or name not in results.scores:
        return None
    board = results.leaderboard()
    return {"data": results.data, "examples": results.examples, "target_tokens": results.target_tokens,
            "metrics": results.metrics, "rank": board.index(name) + 1, "of": len(board),
            "adapter": results.scores[name], "base": results.scores.get(BASE)}


def _training(adapter_dir: Path) -> Optional[dict[str, Any]]:
    """Facts from the trainer's train_summary.json: in the adapter directory itself (one adapter per run), or in
    its parent (`train --out-per-data`: one entry per adapter directory, one source per adapter)."""
    from ..train.run import source_name

    for place, own in ((adapter_dir, True), (adapter_dir.parent, False)):
        try:
            summary = json.loads((place / TRAIN_SUMMARY).read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue
        if not isinstance(summary, dict):
            continue
        entries = [v for v in summary.get("adapters", {}).values() if isinstance(v, dict)]
        mine = [v for v in entries if Path(str(v.get("path", ""))).name == adapter_dir.name or
                Path(str(v.get("path", ""))).resolve() == adapter_dir.resolve()]
        if not mine and not (own and len(entries) == 1):
            continue  # this summary is about other adapters
        entry = mine[0] if mine else entries[0]
        sources = summary.get("data", {})
        if not own:
            sources = {s: f for s, f in sources.items() if source_name(s) == adapter_dir.name} or sources
        config = summary.get("config", {})
        keep = ("base", "data", "rank", "alpha", "targets", "lr", "epochs", "max_steps", "batch_size", "max_length",
                "eval_split", "seed")
        return {"summary": str(place / TRAIN_SUMMARY), "sources": sources, "steps": entry.get("steps"),
                "train_examples": entry.get("train_examples"), "eval_examples": entry.get("eval_examples"),
                "eval_loss_before": entry.get("eval_loss_before"), "eval_loss_after": entry.get("eval_loss_after"),
                "config": {k: config[k] for k in keep if k in config}}
    return None


# -- the card --------------------------------------------------------------------------------------------------
def _md_table(rows: list[list[Any]], head: list[str]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + \
        ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]  # a bare | splits cells


def _num(x: Any, spec: str = ".4g") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec) if isinstance(x, float) else str(x)


def model_card(r: PromoteReport) -> str:
    """MODEL_CARD.md text for a promote report."""
    lines = [f"# {Path(r.out).name}: {r.base} + adapter `{r.name}` (merged)", "",
             f"The base `{r.base}` with the LoRA adapter `{r.name}` merged into its weights "
             "(W' = W + scale * B @ A). It loads with plain transformers; loraplex is not needed:", "",
             "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
             f'model = AutoModelForCausalLM.from_pretrained("{r.out}")', "```", "", "## Adapter", ""]
    lines += _md_table([["name", f"`{r.name}`"], ["content hash (sha256)", f"`{r.content_hash}`"],
                        ["source directory", f"`{r.adapter_path}`"], ["weights dtype", r.dtype]], ["", ""])
    lines += ["", "## Training data", ""]
    t = r.training
    if t is None:
        lines.append("Not recorded: no train_summary.json beside the adapter.")
    else:
        rows = [[f"`{src}`", f.get("records"), f.get("examples"), f.get("skipped"), f.get("truncated")]
                for src, f in t["sources"].items()]
        lines += _md_table(rows, ["source", "records", "examples", "skipped", "truncated"]) + [""]
        lines.append(f"Steps {_num(t['steps'])}, {_num(t['train_examples'])} train / {_num(t['eval_examples'])} "
                     f"held-out examples; held-out loss {_num(t['eval_loss_before'])} -> {_num(t['eval_loss_after'])}. "
                     f"Settings: {json.dumps(t['config'])} (from `{t['summary']}`).")
    lines += ["", "## Evaluation", ""]
    m = r.metrics
    if m is None:
        lines.append("No evaluation results were given (run `loraplex eval ... --out results.json`, then "
                     "`loraplex promote ... --results results.json`).")
    else:
        def show(k: str, x: Any) -> str:
            higher = METRICS[k] == "higher" and isinstance(x, float) and not math.isnan(x)
            return f"{100 * x:.1f}%" if higher else _num(x)

        rows = [[k, show(k, m["adapter"].get(k)), show(k, (m["base"] or {}).get(k)), METRICS[k]]
                for k in m["metrics"]]
        lines += _md_table(rows, ["metric", f"`{r.name}`", "base", "better"]) + [""]
        by = "loss" if "loss" in m["metrics"] else m["metrics"][0]
        lines.append(f"Rank {m['rank']} of {m['of']} (base included) by {by} "
                     f"on {m['data']}: {m['examples']} examples, {m['target_tokens']} target tokens.")
    p = r.parity
    lines += ["", "## Parity", "",
              f"This directory loaded with `AutoModelForCausalLM.from_pretrained` vs the fp32 base with the adapter "
              f"applied on the fly, on {r.probes}:", ""]
    lines += _md_table([[p["dtype"], _num(p["max_abs"], ".3g"), _num(p["worst_ratio"], ".3g"), _num(p["kl"], ".3g"),
                         f"{100 * p['agree']:.1f}%", p["tolerance"], p["status"]]],
                       ["logits dtype", "max abs dlogit", "worst d/tol", "KL", "greedy agreement", "tolerance",
                        "result"])
    lines += ["", f"Made by loraplex {r.loraplex_version} on {r.created}.", ""]
    return "\n".join(lines)
