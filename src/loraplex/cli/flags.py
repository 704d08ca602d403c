"""Command-line flags derived from a config dataclass: its fields give the names, types and defaults once.

    field `grad_accum: int = 1`          ->  --grad-accum (type int, default 1)
    field `max_steps: Optional[int] = None` -> --max-steps (type int, default None)
    field `packing: bool = False`        ->  --packing / --no-packing (default False)
    field `base: str` (no default)       ->  --base (required)
A command supplies only what a dataclass cannot say: the help text, the group, argparse overrides (a
parsing `type`, `choices`, `action="append"`) and, rarely, another flag name, in a table of `Flag`s keyed
by field name.

`add_command` makes a subcommand's parser from its module's docstring (one text for `--help`). The flags
several commands share with one meaning are spelled once here too: `add_base` (the base model
spec), `add_num_layers` (--num-layers) and `add_output_flags` (--out / --overwrite of a command that writes a
new directory).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

_SCALARS = (int, float, str)


@dataclass(frozen=True)
class Flag:
    """What the command line adds to one dataclass field: help, the argument group, argparse overrides."""

    help: str = ""
    group: str = ""  # "" = the parser itself, else the title of an argument group
    overrides: Mapping[str, Any] = field(default_factory=dict)  # e.g. {"type": parse_targets}
    name: str = ""  # the flag's name when it is not the field's (use_dora -> --dora); "" = the field's


def default_of(cls: type, name: str) -> Any:
    """The default of dataclass field `name` of `cls` (its default_factory called); KeyError when it has none."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise KeyError(f"{cls.__name__}.{name} has no default")


def _scalar_type(hint: Any) -> type | None:
    """int/float/str/bool for a hint (Optional[X] -> X; str | Path -> str); None when no scalar fits."""
    if hint in (*_SCALARS, bool):
        return hint
    if typing.get_origin(hint) in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return _scalar_type(args[0])
        if set(args) == {str, Path}:
            return str
    return None


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, table: Mapping[str, Flag],
                        skip: Mapping[str, str] | None = None) -> None:
    """Add one --flag per field of dataclass `cls` to `parser` (in `table` order, then the fields the table
    leaves out), dest = the field name, default = the field's default (required when it has none).
    bool fields become --x / --no-x (BooleanOptionalAction). `skip`: field -> why it has no flag here (e.g.
    another flag of the command sets it). A field whose type maps to no argparse type must name one in its
    `overrides` (TypeError otherwise), as must every key of `table` name a field (KeyError otherwise)."""
    fields, skip = {f.name: f for f in dataclasses.fields(cls)}, skip or {}
    unknown = (set(table) | set(skip)) - set(fields)
    if unknown:
        raise KeyError(f"{cls.__name__} has no fields {sorted(unknown)}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    groups: dict[str, Any] = {"": parser}
    for name in [*table, *(n for n in fields if n not in table and n not in skip)]:
        spec = table.get(name, Flag())
        if spec.group not in groups:
            groups[spec.group] = parser.add_argument_group(spec.group)
        kwargs: dict[str, Any] = {"dest": name, "help": spec.help or None}
        try:
            kwargs["default"] = default_of(cls, name)
        except KeyError:
            kwargs["required"] = True
        kind = _scalar_type(hints[name])
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind is not None:
            kwargs["type"] = kind
        elif "type" not in spec.overrides and "action" not in spec.overrides:
            raise TypeError(f"{cls.__name__}.{name}: type {hints[name]} has no argparse type; give one in its Flag")
        kwargs.update(spec.overrides)
        groups[spec.group].add_argument("--" + (spec.name or name).replace("_", "-"), **kwargs)


# ---- flags several commands share ---------------------------------------------------------------------------
def add_command(sub: argparse._SubParsersAction, doc: str | None,
                run: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    """The parser of a subcommand from its module docstring, "`loraplex NAME`: HELP." then the description:
    HELP is its line in `loraplex --help`, the rest (printed as written) heads `loraplex NAME --help`; `run`
    handles the parsed arguments (args -> exit code)."""
    first, _, description = inspect.cleandoc(doc or "").partition("\n\n")
    match = re.fullmatch(r"`loraplex ([a-z-]+)`: (.+)\.", " ".join(first.split()), re.DOTALL)
    if match is None:  # a programming error in a cli module, caught by the --help test of every command
        raise ValueError(f"a command module's docstring must start '`loraplex NAME`: HELP.', got {first!r}")
    parser = sub.add_parser(match[1], help=match[2], description=description,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(func=run)
    return parser


BASE_HELP = ("'smollm2' (the embedded default), 'tiny-llama', 'tiny-gpt2', a local transformers model directory, "
             "or a Hugging Face model id in the local HF cache (never downloaded)")


def add_base(parser: argparse.ArgumentParser, *, positional: bool = False, required: bool = True,
             note: str = "") -> None:
    """The base model spec every command loads with models.load_base: --base (required unless `required` is
    False), or the positional `base`; `note` adds what this command needs of it (e.g. a tokenizer)."""
    text = BASE_HELP + (f"; {note}" if note else "")
    if positional:
        parser.add_argument("base", help=text)
    else:
        parser.add_argument("--base", required=required, help=text)


def add_num_layers(parser: argparse.ArgumentParser, models: str = "the base") -> None:
    """--num-layers N (default None: all): load only the first N decoder layers of `models` (load_base's
    num_layers)."""
    parser.add_argument("--num-layers", type=int, help=f"load only the first N decoder layers of {models}")


def add_output_flags(parser: argparse.ArgumentParser, what: str = "directory", never: str = "") -> None:
    """--out DIR (required): the output `what`, new or empty, written atomically; --overwrite: replace an existing
    one, atomically (outputs.check_output); `never`: what it never replaces, when the help should say so."""
    parser.add_argument("--out", required=True, help=f"output {what}: new or empty (written atomically)")
    parser.add_argument("--overwrite", action="store_true",
                        help=f"replace an existing --out (atomically{'; never ' + never if never else ''})")
