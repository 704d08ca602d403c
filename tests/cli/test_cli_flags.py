"""cli/flags.py: command-line flags derived from a config dataclass (train's flags from TrainConfig)."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Optional, Union

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loraplex import LoraConfig
from loraplex.cli import build_parser
from loraplex.cli.flags import Flag, add_dataclass_flags, default_of
from loraplex.cli.train import FLAGS
from loraplex.train.loop import TrainConfig

REQUIRED = ["--base", "b", "--data", "d.jsonl", "--out", "o"]


def _subparser(command: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def test_every_train_config_field_has_a_flag_with_the_dataclass_default():
    args = build_parser().parse_args(["train", *REQUIRED])
    dests = {a.dest for a in _subparser("train")._actions}
    for f in dataclasses.fields(TrainConfig):
        assert f.name in dests, f"TrainConfig.{f.name} has no flag"  # progress: the common --progress flag
        if f.default is not dataclasses.MISSING:
            assert getattr(args, f.name) == f.default, f.name
    # the parsed namespace builds the dataclass as is (run_train passes every field by name)
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    assert config.data == ["d.jsonl"] and str(config.out) == "o"


def test_train_flags_have_help_and_table_names_fields():
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(FLAGS) <= fields
    assert fields - set(FLAGS) == {"progress"}  # a new TrainConfig field needs a FLAGS row (help, group)


def test_alpha_and_rank_defaults_come_from_the_config_dataclasses():
    train = build_parser().parse_args(["train", *REQUIRED])
    info = build_parser().parse_args(["info", "smollm2"])
    assert (train.rank, train.alpha) == (TrainConfig.rank, TrainConfig.alpha)
    assert info.rank == default_of(LoraConfig, "r") == LoraConfig(target_modules="all-linear").r
    assert default_of(LoraConfig, "lora_alpha") == LoraConfig(target_modules="all-linear").lora_alpha


@given(rank=st.integers(1, 64), alpha=st.floats(0.5, 64, allow_nan=False), max_steps=st.none() | st.integers(1, 99),
       packing=st.booleans(), resume=st.booleans(), quantize=st.sampled_from(["none", "int8", "nf4"]))
@settings(max_examples=25, deadline=None)
def test_flags_round_trip_into_train_config(rank, alpha, max_steps, packing, resume, quantize):
    argv = ["train", *REQUIRED, "--rank", str(rank), "--alpha", repr(alpha), "--quantize", quantize,
            "--packing" if packing else "--no-packing", *(["--resume"] if resume else [])]
    argv += [] if max_steps is None else ["--max-steps", str(max_steps)]
    args = build_parser().parse_args(argv)
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    assert (config.rank, config.alpha, config.max_steps) == (rank, alpha, max_steps)
    assert (config.packing, config.resume, config.quantize) == (packing, resume, quantize)


@dataclass
class _Config:
    name: str
    count: int = 3
    ratio: Optional[float] = None
    fast: bool = True
    items: list[str] = dataclasses.field(default_factory=lambda: ["a"])


def test_add_dataclass_flags_types_defaults_required():
    p = argparse.ArgumentParser()
    add_dataclass_flags(p, _Config, {"items": Flag("list", overrides={"nargs": "+", "type": str})})
    args = p.parse_args(["--name", "x"])
    assert vars(args) == {"items": ["a"], "name": "x", "count": 3, "ratio": None, "fast": True}
    args = p.parse_args(["--name", "x", "--count", "5", "--ratio", "0.5", "--no-fast", "--items", "b", "c"])
    assert vars(args) == {"items": ["b", "c"], "name": "x", "count": 5, "ratio": 0.5, "fast": False}
    with pytest.raises(SystemExit):
        p.parse_args([])  # --name has no default: required


def test_add_dataclass_flags_refuses_what_it_cannot_map():
    with pytest.raises(KeyError, match="no fields"):
        add_dataclass_flags(argparse.ArgumentParser(), _Config, {"nmae": Flag()})
    with pytest.raises(TypeError, match="items"):
        add_dataclass_flags(argparse.ArgumentParser(), _Config, {})  # list[str] needs a type in its Flag

    @dataclass
    class Mixed:
        value: Union[int, str] = 0

    with pytest.raises(TypeError, match="value"):
        add_dataclass_flags(argparse.ArgumentParser(), Mixed, {})
