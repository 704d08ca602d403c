"""`loraplex eval`: score the base and many adapters on held-out data in one pass; leaderboard, JSON, chart.

Loads every adapter onto one base; each batch holds every example once per adapter (and once for the base), routed
per row, so one pass over the data scores them all. Metrics over completion tokens: loss (token-weighted mean
cross-entropy), perplexity = exp(loss), next-token accuracy; exact_match = greedy reply equals the reference
(whitespace and case normalized). See docs/workflow.md.
"""

from __future__ import annotations

import argparse
import os

from ..errors import ConfigError
from ..extras import require
from ..workflows.evaluate import DEFAULT_METRICS, METRICS, evaluate
from ..device import DEVICE_HELP, parse_device, resolve_device
from ..models import load_base
from ..outputs import check_output
from ..workflows.plot import plot_results
from .flags import add_base, add_command, add_num_layers


def register(sub: argparse._SubParsersAction) -> list[str]:
    p = add_command(sub, __doc__, run_eval)
    add_base(p, note="it needs a tokenizer")
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
    add_num_layers(p)
    p.add_argument("--device", type=parse_device, default="auto", help=DEVICE_HELP)
    p.add_argument("--out", help="write the results as JSON here (input of `promote --results`)")
    p.add_argument("--plot", help="write a PNG bar chart here: one panel per metric, one bar per variant")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out / --plot file")

    return ["eval"]


def adapter_args(items: list[str]) -> list[str]:
    return [part for item in items for part in item.split(",") if part]


def run_eval(args: argparse.Namespace) -> int:
    if args.plot:  # before the long pass, not after it
        require("plot", "eval --plot")
    metrics = [m for item in args.metrics for m in item.replace(",", " ").split()]
    named = [args.base, *args.data,
             *(a if os.path.exists(a) else a.partition("=")[2] for a in adapter_args(args.adapters))]  # NAME=DIR
    for path in (args.out, args.plot):  # refuse before the pass, not after it; never replace an input
        if path:
            check_output(path, overwrite=args.overwrite, inputs=[p for p in named if os.path.exists(p)])
    model, tokenizer = load_base(args.base, num_layers=args.num_layers)
    model.to(resolve_device(args.device))
    if tokenizer is None:
        raise ConfigError(f"base {args.base!r} has no tokenizer; eval needs a model directory with one")
    result = evaluate(model, tokenizer, adapter_args(args.adapters), list(args.data), metrics=metrics,
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
