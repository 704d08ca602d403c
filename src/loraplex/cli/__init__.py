"""`loraplex` command line: thin subcommands over the Python API (each mirrors a library call).

One module per subcommand, named after it (cli/info.py, cli/quant_report.py, ...); its docstring is the
command's help and description, and its `register(subparsers)` adds the parser (flags.add_command, which sets
`func`: the handler, args -> exit code) and its flags. Every subcommand also gets the common flags
(`--progress / --no-progress`, `--log-level`), added here once. Exit status: 0 success, 1 failure (an error
of the LoraplexError family prints one clear line on stderr, no traceback), 2 usage error (argparse);
anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import sys
from collections.abc import Iterator, Sequence
from typing import Optional

from .. import __version__
from ..errors import LoraplexError, UsageError

# name -> module providing register(subparsers); order = order in --help
COMMANDS = {
    "info": "loraplex.cli.info",
    "merge": "loraplex.cli.merge",
    "verify": "loraplex.cli.verify",
    "train": "loraplex.cli.train",
    "combine": "loraplex.cli.combine",
    "extract": "loraplex.cli.extract",
    "serve": "loraplex.cli.serve",
    "eval": "loraplex.cli.eval",
    "promote": "loraplex.cli.promote",
    "quantize": "loraplex.cli.quantize",
    "quant-report": "loraplex.cli.quant_report",
}


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class _CommandParser(argparse.ArgumentParser):
    """A subcommand's parser: whatever `register` adds, plus the flags every command shares."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        g = self.add_argument_group("common")
        g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="progress bars on stderr, loraplex's and transformers'/huggingface_hub's "
                            "(default: ours only when stderr is a terminal; --no-progress silences all)")
        g.add_argument("--log-level", type=str.lower, choices=LOG_LEVELS, default=None,
                       help="level of the 'loraplex' logger and transformers' verbosity (default: leave both "
                            "as they are: warnings; `serve` passes it to uvicorn, default info)")


@contextlib.contextmanager
def common_options(args: argparse.Namespace) -> Iterator[None]:
    """Apply --no-progress and --log-level for the duration of a command (restored after, for callers of main)."""
    with contextlib.ExitStack() as stack:
        if args.progress is False:
            from ..workflows.probes import no_progress_bars  # transformers' switch also turns huggingface_hub's off

            stack.enter_context(no_progress_bars())
        if args.log_level is not None:
            stack.enter_context(_log_level(getattr(logging, args.log_level.upper())))
        yield


@contextlib.contextmanager
def _log_level(level: int) -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    logger, was_hf = logging.getLogger("loraplex"), hf_logging.get_verbosity()
    was, handler = logger.level, logging.StreamHandler(sys.stderr)  # lastResort would drop INFO/DEBUG
    handler.setFormatter(logging.Formatter("%(name)s: %(levelname)s: %(message)s"))
    logger.setLevel(level)
    logger.addHandler(handler)
    hf_logging.set_verbosity(level)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(was)
        hf_logging.set_verbosity(was_hf)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraplex",
        description="LoRA adapters on one frozen base: inspect, train, serve side by side, combine, merge.",
    )
    parser.add_argument("--version", action="version", version=f"loraplex {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_CommandParser)
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
        with common_options(args):
            return int(args.func(args) or 0)
    except LoraplexError as exc:
        print(f"loraplex {args.command}: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
