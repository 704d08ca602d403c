"""`loraplex promote`: merge the chosen adapter, check parity, write a deployable directory + MODEL_CARD.md.

W' = W + scale * B @ A written as a plain transformers directory; then loaded back with AutoModelForCausalLM and
compared with base + adapter on the fly (nothing is written when the check fails). The model card records the base,
the adapter's content hash, its training data (train_summary.json), the eval metrics and the parity numbers.
"""

from __future__ import annotations

import argparse

from ..workflows.export import DTYPES
from ..workflows.probes import read_prompts
from ..workflows.promote import CARD_NAME, promote
from ..workflows.verify import Row, VerifyReport
from .eval import adapter_args
from .flags import add_base, add_command, add_num_layers, add_output_flags


def register(sub: argparse._SubParsersAction) -> list[str]:
    p = add_command(sub, __doc__, run_promote)
    p.add_argument("name", metavar="NAME", help="adapter name, or 'best' (the leaderboard winner of --results)")
    add_base(p)
    p.add_argument("--adapters", required=True, nargs="+",
                   help="the adapter directory, or the folder(s) holding adapter NAME (as given to eval)")
    add_output_flags(p)
    p.add_argument("--results", help="results JSON written by `loraplex eval --out`")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the written weights")
    add_num_layers(p)
    p.add_argument("--prompts", help="text file, one parity probe prompt per line (default: built-in prompts)")
    return ["promote"]


def run_promote(args: argparse.Namespace) -> int:
    prompts = read_prompts(args.prompts) if args.prompts else None
    adapters = adapter_args(args.adapters)
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
