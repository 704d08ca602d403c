"""`loraplex` command line: thin subcommands over the Python API (each mirrors a library call).

Subcommands live beside the code they drive; each module has `register(subparsers)` that adds its parser
and sets `func` (the handler, args -> exit code). Errors of the LoraplexError family print one clear line
and exit with status 2; anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Optional

from . import __version__
from .errors import LoraplexError

# name -> module providing register(subparsers); order = order in --help
COMMANDS = {
    "info": "loraplex.commands",
    "merge": "loraplex.commands",
    "verify": "loraplex.verify",
    "train": "loraplex.train.cli",
    "combine": "loraplex.combine_cli",
    "extract": "loraplex.combine_cli",
    "serve": "loraplex.serve.cli",
    "eval": "loraplex.eval_cli",
    "promote": "loraplex.eval_cli",
    "quantize": "loraplex.quant.cli",
    "quant-report": "loraplex.quant.cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraplex",
        description="LoRA adapters on one frozen base: inspect, train, serve side by side, combine, merge.",
    )
    parser.add_argument("--version", action="version", version=f"loraplex {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    registered: set[str] = set()
    for module_name in dict.fromkeys(COMMANDS.values()):
        module = importlib.import_module(module_name)
        registered.update(module.register(sub))
    missing = set(COMMANDS) - registered
    if missing:  # a COMMANDS entry whose module did not register it
        raise RuntimeError(f"commands {sorted(missing)} are listed but not registered")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except LoraplexError as exc:
        print(f"loraplex {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
