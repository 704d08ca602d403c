"""`loraplex verify`: parity report: merged / on-the-fly / mixed batch / quantized / exported vs the reference.

Compare each way of running an adapter with base + adapter on the fly in fp32 on a probe set: max |delta logit|, KL,
greedy agreement, PASS/FAIL per dtype. Exit status 1 when a required check fails. See docs/verify.md.
"""

from __future__ import annotations

import argparse

from ..device import DEVICE_HELP, parse_device, resolve_device
from ..errors import ConfigError
from ..workflows.export import DTYPES
from ..workflows.probes import read_prompts
from ..workflows.verify import ALL_VARIANTS, VARIANTS, VerifyReport, check_golden, record_golden_from, verify
from .flags import add_base, add_command, add_num_layers


def register(sub: argparse._SubParsersAction) -> list[str]:
    p = add_command(sub, __doc__, run_verify)
    add_base(p, required=False, note="required unless --against compares with recorded golden outputs")
    p.add_argument("--adapter", required=True, metavar="DIR", help="adapter directory")
    p.add_argument("--prompts", metavar="FILE", help="text file, one prompt per line (default: built-in prompts)")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES), metavar="DTYPE",
                   help=f"dtypes to run each variant in, of {sorted(DTYPES)} (default: fp32 bf16)")
    p.add_argument("--variants", nargs="+", default=list(ALL_VARIANTS), choices=list(VARIANTS), metavar="VARIANT",
                   help=f"variants to compare, of {list(VARIANTS)} (default: all)")
    p.add_argument("--max-length", type=int, default=32, help="tokens per probe (default 32)")
    add_num_layers(p)
    p.add_argument("--record-golden", action="store_true",
                   help="store the reference logits in the adapter directory (golden.safetensors + golden.json)")
    p.add_argument("--against", metavar="DIR",
                   help="a deployed merged model directory to check against the stored golden logits")
    p.add_argument("--device", type=parse_device, default="auto",
                   help=f"where the reference, the variants and --against run: {DEVICE_HELP}")
    return ["verify"]


def run_verify(args: argparse.Namespace) -> int:
    if args.base is None and (args.against is None or args.record_golden):
        raise ConfigError("--base is required (only --against alone checks a deployment without it)")
    lines, report, device = [], VerifyReport("", args.adapter), resolve_device(args.device)
    if args.base is not None:
        prompts = read_prompts(args.prompts) if args.prompts else None
        report = verify(args.base, args.adapter, prompts=prompts, dtypes=args.dtypes, variants=args.variants,
                        max_length=args.max_length, num_layers=args.num_layers, device=device)
        print(f"base {report.base}  adapter {report.adapter} ({report.context.adapter.content_hash[:12]})  "
              f"probes: {report.probes.source}, {report.probes.positions} positions; reference: fp32 on the fly")
        if args.record_golden:
            facts = record_golden_from(report, args.adapter)
            lines.append(f"recorded golden logits in {args.adapter}: {facts['logits']}, {facts['positions']} "
                         f"positions, {facts['bytes']:,} bytes")
    if args.against is not None:
        report.rows.extend(check_golden(args.against, args.adapter, device).rows)
    print(report.table())
    print(report.summary())
    for line in lines:
        print(line)
    return 0 if report.passed else 1
