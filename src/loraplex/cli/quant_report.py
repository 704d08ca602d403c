"""`loraplex quant-report`: measure merging an adapter into a quantized base, three ways.

Against the fp32 base with the adapter merged: the quantized base alone, (a) requantize Q(deQ(Wq)+d), (b)
from_original Q(W+d), (c) separate (on the fly); max |dlogit|, KL, perplexity, greedy agreement, and a
recommendation per scheme.

loraplex quant-report --base smollm2 --adapter my_adapter --schemes int8 nf4
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from ..errors import DataError
from ..models import load_base
from ..quant.compare import DEFAULT_PROBE_TEXTS, compare_merge_strategies, probe_ids_from_texts, random_probe_ids
from ..quant.linear import SCHEMES
from ..workflows.probes import read_prompts
from .flags import add_base, add_command, add_num_layers


def register(sub: argparse._SubParsersAction) -> list[str]:
    p = add_command(sub, __doc__, run_quant_report)
    add_base(p)
    p.add_argument("--adapter", required=True, help="adapter directory (adapter_config.json + safetensors)")
    p.add_argument("--schemes", nargs="+", default=["int8", "nf4"], choices=[*SCHEMES, "nf4+dq"],
                   help="schemes to compare (default: int8 nf4); nf4+dq = nf4 with double quantization")
    add_num_layers(p)
    p.add_argument("--prompts", help="probe text file, one prompt per line (default: built-in sentences; "
                                     "random token ids for a base without a tokenizer)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per probe row (default 64)")
    p.add_argument("--rows", type=int, default=4, help="probe rows at most (default 4)")
    p.add_argument("--no-check-base", action="store_true", help="skip the adapter's base fingerprint check")
    p.add_argument("--json", action="store_true", help="print the rows and recommendations as JSON")
    return ["quant-report"]


def run_quant_report(args: argparse.Namespace) -> int:
    model, tokenizer = load_base(args.base, num_layers=args.num_layers)
    if tokenizer is not None:
        texts = DEFAULT_PROBE_TEXTS if args.prompts is None else read_prompts(args.prompts)
        ids = probe_ids_from_texts(tokenizer, texts, seq_len=args.seq_len, max_rows=args.rows)
    elif args.prompts is not None:
        raise DataError(f"base {args.base!r} has no tokenizer, so --prompts cannot be tokenized; leave it out "
                        "(random token ids are used)")  # fmt: skip
    else:
        ids = random_probe_ids(model.config.vocab_size, rows=args.rows, seq_len=args.seq_len)
    result = compare_merge_strategies(model, args.adapter, ids, args.schemes, check_base_model=not args.no_check_base)
    if args.json:
        print(json.dumps({"probe_shape": list(result.probe_shape), "rows": [asdict(r) for r in result.rows],
                          "recommendations": result.recommendations}, indent=2))
        return 0
    if tokenizer is None:
        print("(no tokenizer: the probe is random token ids)")
    print(result)
    return 0
