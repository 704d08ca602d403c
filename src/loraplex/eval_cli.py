"""Subcommands `eval` (score the base and many adapters in one pass, leaderboard, JSON, chart) and `promote`
(merge the chosen adapter, check parity, write the deployable directory with a model card)."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from .errors import ConfigError
from .extras import require
from .evaluate import BASE, DEFAULT_METRICS, METRICS, EvalResult, evaluate
from .export import DTYPES
from .device import DEVICE_HELP, parse_device, resolve_device
from .models import load_base
from .probes import read_prompts
from .store import check_output, write_png
from .promote import CARD_NAME, promote
from .verify import Row, VerifyReport


def register(sub: argparse._SubParsersAction) -> list[str]:
    p = sub.add_parser(
        "eval", help="score the base and many adapters on held-out data in one pass; leaderboard, JSON, chart",
        description="Loads every adapter onto one base; each batch holds every example once per adapter (and "
                    "once for the base), routed per row, so one pass over the data scores them all. Metrics over "
                    "completion tokens: loss (token-weighted mean cross-entropy), perplexity = exp(loss), "
                    "next-token accuracy; exact_match = greedy reply equals the reference (whitespace and case "
                    "normalized). See docs/workflow.md.")
    p.add_argument("--base", required=True, help="a transformers model directory with a tokenizer, or 'smollm2'")
    p.add_argument("--adapters", required=True, nargs="+",
                   help="adapter directories, folders of them, or NAME=DIR (comma-separated lists too)")
    p.add_argument("--data", required=True, nargs="+", help="JSONL files, chatterbot:TOPIC or fortunes:CATEGORY")
    p.add_argument("--metrics", nargs="+", default=[",".join(DEFAULT_METRICS)],
                   help=f"some of {', '.join(METRICS)} (comma- or space-separated; default all)")
    p.add_argument("--batch-size", type=int, default=4, help="examples per forward; each runs once per variant")
    p.add_argument("--max-length", type=int, default=512, help="tokens per example (longer ones are cut)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="greedy token cap for exact_match")
    p.add_argument("--limit", type=int, help="evaluate the first N examples only")
    p.add_argument("--eval-split", type=float,
                   help="evaluate only the held-out part of the split `loraplex train --eval-split F --seed S` made")
    p.add_argument("--seed", type=int, default=0, help="the seed of that split (default 0, train's default)")
    p.add_argument("--no-base", action="store_true", help="leave the bare base out of the leaderboard")
    p.add_argument("--skip-bad", action="store_true", help="skip malformed records instead of failing")
    p.add_argument("--num-layers", type=int, help="load only the first N decoder layers of the base")
    p.add_argument("--device", type=parse_device, default="auto", help=DEVICE_HELP)
    p.add_argument("--out", help="write the results as JSON here (input of `promote --results`)")
    p.add_argument("--plot", help="write a PNG bar chart here: one panel per metric, one bar per variant")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out / --plot file")
    p.set_defaults(func=run_eval)

    p = sub.add_parser(
        "promote", help="merge the chosen adapter, check parity, write a deployable directory + MODEL_CARD.md",
        description="W' = W + scale * B @ A written as a plain transformers directory; then loaded back with "
                    "AutoModelForCausalLM and compared with base + adapter on the fly (nothing is written when "
                    "the check fails). The model card records the base, the adapter's content hash, its training "
                    "data (train_summary.json), the eval metrics and the parity numbers.")
    p.add_argument("name", metavar="NAME", help="adapter name, or 'best' (the leaderboard winner of --results)")
    p.add_argument("--base", required=True, help="a transformers model directory, or 'smollm2'")
    p.add_argument("--adapters", required=True, nargs="+",
                   help="the adapter directory, or the folder(s) holding adapter NAME (as given to eval)")
    p.add_argument("--out", required=True, help="output directory (new or empty; written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (atomically)")
    p.add_argument("--results", help="results JSON written by `loraplex eval --out`")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the written weights")
    p.add_argument("--num-layers", type=int, help="load only the first N decoder layers of the base")
    p.add_argument("--prompts", help="text file, one parity probe prompt per line (default: built-in prompts)")
    p.set_defaults(func=run_promote)
    return ["eval", "promote"]


def _adapters(items: list[str]) -> list[str]:
    return [part for item in items for part in item.split(",") if part]


def run_eval(args: argparse.Namespace) -> int:
    if args.plot:  # before the long pass, not after it
        require("plot", "eval --plot")
    metrics = [m for item in args.metrics for m in item.replace(",", " ").split()]
    named = [args.base, *args.data,
             *(a if os.path.exists(a) else a.partition("=")[2] for a in _adapters(args.adapters))]  # NAME=DIR
    for path in (args.out, args.plot):  # refuse before the pass, not after it; never replace an input
        if path:
            check_output(path, overwrite=args.overwrite, inputs=[p for p in named if os.path.exists(p)])
    model, tokenizer = load_base(args.base, num_layers=args.num_layers)
    model.to(resolve_device(args.device))
    if tokenizer is None:
        raise ConfigError(f"base {args.base!r} has no tokenizer; eval needs a model directory with one")
    result = evaluate(model, tokenizer, _adapters(args.adapters), list(args.data), metrics=metrics,
                      batch_size=args.batch_size, max_length=args.max_length, include_base=not args.no_base,
                      max_new_tokens=args.max_new_tokens, limit=args.limit, eval_split=args.eval_split,
                      seed=args.seed, progress=args.progress)
    scored = f"; exact_match over {result.generated} prompted examples" if "exact_match" in result.metrics else ""
    print(f"base {result.base} | data {result.data}: {result.examples} examples, {result.target_tokens} target "
          f"tokens{scored}")
    print(result.table())
    if args.out:
        print(f"wrote {result.save(args.out, overwrite=args.overwrite)}")
    if args.plot:
        print(f"wrote {plot_results(result, args.plot, overwrite=args.overwrite)}")
    return 0


def run_promote(args: argparse.Namespace) -> int:
    prompts = read_prompts(args.prompts) if args.prompts else None
    adapters = _adapters(args.adapters)
    report = promote(args.name, args.base, adapters[0] if len(adapters) == 1 else adapters, args.out,
                     eval_results=args.results, dtype=args.dtype, num_layers=args.num_layers, prompts=prompts,
                     overwrite=args.overwrite)
    print(f"adapter {report.name} ({report.content_hash[:12]}) from {report.adapter_path}, merged into "
          f"{report.base} ({report.dtype})")
    print(VerifyReport(report.base, report.adapter_path, [Row(**report.parity)]).table())
    if report.metrics:
        m = report.metrics
        print(f"eval: rank {m['rank']} of {m['of']}; " + ", ".join(f"{k} {m['adapter'][k]:.4g}" for k in m["metrics"]))
    print(f"wrote {report.out} (with {CARD_NAME})")
    return 0


def plot_results(result: EvalResult, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """A PNG bar chart of `result` (matplotlib Agg), written atomically (an existing file is replaced only with
    `overwrite`): one panel per metric, one bar per variant in leaderboard order, the base in grey; returns the path.
    Raises MissingDependencyError without matplotlib (the 'plot' extra)."""
    require("plot", "plotting eval results")
    import matplotlib

    matplotlib.use("Agg", force=False)  # keep a caller's backend if pyplot is already set up
    from matplotlib.figure import Figure

    order = result.leaderboard()
    n = len(result.metrics)
    fig = Figure(figsize=(max(4.0, 0.6 * len(order) + 1.5) * n, 3.8), dpi=100)  # bare Figure: no pyplot state
    axes = fig.subplots(1, n, squeeze=False)[0]
    colors = ["0.6" if v == BASE else f"C{i % 10}" for i, v in enumerate(order)]
    for ax, metric in zip(axes, result.metrics):
        values = [result.scores[v][metric] for v in order]
        shown = [0.0 if math.isnan(x) else x for x in values]
        bars = ax.bar(range(len(order)), shown, color=colors)
        for bar, x in zip(bars, values):
            label = "n/a" if math.isnan(x) else f"{100 * x:.0f}%" if METRICS[metric] == "higher" else f"{x:.4g}"
            ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                        fontsize="small", xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(range(len(order)), order, rotation=30, ha="right", fontsize="small")
        ax.set_title(f"{metric} ({'lower' if METRICS[metric] == 'lower' else 'higher'} is better)", fontsize="medium")
        if METRICS[metric] == "higher":
            ax.set_ylim(0, 1.05)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"loraplex eval: {result.base} on {result.data} ({result.examples} examples)", fontsize="medium")
    fig.tight_layout()
    return write_png(fig, path, overwrite=overwrite)
