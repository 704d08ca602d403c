"""The CLI mirrors the API: `info` and `merge` end to end, `--help` everywhere, clean errors."""

from __future__ import annotations

import errno

import pytest
import torch
from transformers import AutoModelForCausalLM

import loraplex as lp
from loraplex.cli import COMMANDS, build_parser, common_options, main
from loraplex.functional import tolerance
from loraplex.models import tiny_llama

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def base_and_adapter(tmp_path):
    base = tiny_llama(seed=5)
    base.save_pretrained(tmp_path / "base")
    model = tiny_llama(seed=5)
    lp.inject(model, lp.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False), "a")
    lp.save_adapter(model, "a", tmp_path / "adapter")
    return tmp_path, model


@pytest.mark.parametrize("command", [[]] + [[c] for c in COMMANDS])
def test_help_everywhere(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main(command + ["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: loraplex" in out
    if command:  # the common flags, added once in cli/__init__.py, reach every subcommand
        assert "--no-progress" in out and "--log-level" in out


def test_info_with_adapter(base_and_adapter, capsys):
    tmp, model = base_and_adapter
    assert main(["info", str(tmp / "base"), str(tmp / "adapter"), "--modules"]) == 0
    out = capsys.readouterr().out
    rep = lp.parameter_report(model)
    assert f"{rep.trainable:,}" in out and "bytes on disk" in out and "q_proj" in out


def test_info_without_adapter(base_and_adapter, capsys):
    tmp, _ = base_and_adapter
    assert main(["info", str(tmp / "base"), "--rank", "8"]) == 0
    assert "65,536" in capsys.readouterr().out  # the 4096x4096 r=8 example


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_merge_writes_a_plain_transformers_model(base_and_adapter, capsys, dtype):
    tmp, model = base_and_adapter
    want = model(IDS).logits.detach()
    out = tmp / f"merged-{dtype}"
    assert main(["merge", "--base", str(tmp / "base"), "--adapter", str(tmp / "adapter"), "--out", str(out),
                 "--dtype", dtype]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out)
    got = merged(IDS).logits.detach().float()
    atol, rtol = tolerance(merged.dtype)
    torch.testing.assert_close(got, want, atol=atol * 10, rtol=rtol * 10)
    assert (out / "loraplex_merge.json").exists()


def test_merge_two_adapters_with_weights(base_and_adapter, tmp_path):
    tmp, model = base_and_adapter
    other = tiny_llama(seed=5)
    lp.inject(other, lp.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), "b", seed=9)
    lp.save_adapter(other, "b", tmp / "b")
    lp.load_adapter(model, tmp / "b", "b", activate=False)
    lp.set_active(model, {"a": 0.6, "b": -0.4})
    want = model(IDS).logits.detach()
    assert main(["merge", "--base", str(tmp / "base"), "--adapter", str(tmp / "adapter"), "--adapter",
                 str(tmp / "b"), "--weights", "0.6", "-0.4", "--out", str(tmp / "m")]) == 0
    got = AutoModelForCausalLM.from_pretrained(tmp / "m")(IDS).logits.detach()
    atol, rtol = tolerance(torch.float32)  # merged W + delta vs the on-the-fly mix: 10x, as test_core's merges
    torch.testing.assert_close(got, want, atol=10 * atol, rtol=10 * rtol)


def test_cli_errors_are_one_clean_line(base_and_adapter, capsys):
    tmp, _ = base_and_adapter
    code = main(["merge", "--base", str(tmp / "base"), "--adapter", str(tmp / "nope"), "--out", str(tmp / "x")])
    assert code == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("loraplex merge: error:") and "not a directory" in err
    assert not (tmp / "x").exists()
    assert main(["merge", "--base", str(tmp / "base"), "--adapter", str(tmp / "adapter"), "--weights", "1", "2",
                 "--out", str(tmp / "x")]) == 1
    assert "one weight per adapter" in capsys.readouterr().err


def test_parser_builds_all_commands():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(COMMANDS) <= set(sub.choices)


# One argv per command that fails inside the command (a path that does not exist), without loading a model.
_MISSING = "/nonexistent/loraplex-test"
FAILING = {
    "info": ["info", _MISSING],
    "merge": ["merge", "--base", _MISSING, "--adapter", _MISSING, "--out", "OUT"],
    "verify": ["verify", "--base", _MISSING, "--adapter", _MISSING],
    "train": ["train", "--base", _MISSING, "--data", _MISSING + ".jsonl", "--out", "OUT"],
    "combine": ["combine", _MISSING, _MISSING + "2", "--weights", "1", "1", "--out", "OUT"],
    "extract": ["extract", "--base", _MISSING, "--finetuned", _MISSING, "--out", "OUT"],
    "serve": ["serve", "--base", _MISSING],
    "eval": ["eval", "--base", _MISSING, "--adapters", _MISSING, "--data", _MISSING + ".jsonl"],
    "promote": ["promote", "a", "--base", _MISSING, "--adapters", _MISSING, "--out", "OUT"],
    "quantize": ["quantize", "--base", _MISSING, "--scheme", "int8", "--out", "OUT"],
    "quant-report": ["quant-report", "--base", _MISSING, "--adapter", _MISSING],
}


def test_every_command_has_a_failing_case():
    assert set(FAILING) == set(COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_exit_status_1_for_failures_2_for_usage(command, tmp_path, capsys):
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in FAILING[command]]
    assert main(argv) == 1  # a LoraplexError: one line on stderr, no traceback
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith(f"loraplex {command}: error:") and "Traceback" not in err
    with pytest.raises(SystemExit) as exc:  # argparse: usage error
        main(argv + ["--no-such-flag"])
    assert exc.value.code == 2 and "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_no_progress_silences_every_bar(tmp_path, capsys):
    """train draws loraplex's own bar (forced with --progress) and transformers draws its weight-loading bar;
    --no-progress silences both, and the switch is undone when main returns."""
    from train_helpers import make_tiny_base, write_data  # tiny Llama + character tokenizer

    tmp = tmp_path
    base, data = make_tiny_base(tmp / "base"), write_data(tmp / "data")["a"]
    argv = ["train", "--base", str(base), "--data", str(data), "--out", str(tmp / "run"), "--max-steps", "2",
            "--batch-size", "4", "--max-length", "32", "--overwrite"]
    capsys.readouterr()
    assert main(argv + ["--progress"]) == 0
    err = capsys.readouterr().err
    assert "Loading weights" in err and "2/2" in err  # both bars are there to silence
    assert main(argv + ["--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "|" not in err and "it/s" not in err and "step/s" not in err and "Loading weights" not in err, err
    assert main(["info", str(base)]) == 0 and "Loading weights" in capsys.readouterr().err  # restored


def test_log_level_sets_loraplex_and_transformers(tmp_path, capsys, caplog):
    import logging

    from transformers.utils import logging as hf_logging

    def transformers_info() -> bool:
        return any(r.name.startswith("transformers") and r.levelno == logging.INFO for r in caplog.records)

    tiny_llama().save_pretrained(tmp_path / "base")
    was = hf_logging.get_verbosity()
    caplog.clear()
    assert main(["info", str(tmp_path / "base")]) == 0 and not transformers_info()
    assert main(["info", str(tmp_path / "base"), "--log-level", "INFO"]) == 0 and transformers_info()
    assert hf_logging.get_verbosity() == was
    capsys.readouterr()
    args = build_parser().parse_args(["info", "x", "--log-level", "debug"])
    with common_options(args):
        assert logging.getLogger("loraplex").getEffectiveLevel() == logging.DEBUG
        logging.getLogger("loraplex.cli_test").info("shown")
    logging.getLogger("loraplex.cli_test").info("not shown")
    err = capsys.readouterr().err
    assert "loraplex.cli_test: INFO: shown" in err and "not shown" not in err


def _merge(tmp, out, *extra, adapter=None):
    return main(["merge", "--base", str(tmp / "base"), "--adapter", str(adapter or tmp / "adapter"), "--out", str(out),
                 *extra])


def test_merge_never_replaces_what_it_was_not_told_to(base_and_adapter, capsys):
    """A user's folder or file at --out stays as it was without --overwrite; an input (adapter or base) is never
    replaced, even with it; with --overwrite the old content is replaced whole."""
    tmp, _ = base_and_adapter
    users = tmp / "users"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    (tmp / "file").write_text("mine too")
    for out in (users, tmp / "file"):
        assert _merge(tmp, out) == 1
        assert "--overwrite" in capsys.readouterr().err
    assert (users / "notes.txt").read_text() == "mine" and (tmp / "file").read_text() == "mine too"
    adapter_files = {p.name: p.read_bytes() for p in (tmp / "adapter").iterdir()}
    for out in (tmp / "adapter", tmp / "base", tmp):  # is the adapter, is the base, holds both
        assert _merge(tmp, out, "--overwrite") == 1
        assert "input" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (tmp / "adapter").iterdir()} == adapter_files
    assert _merge(tmp, users, "--overwrite") == 0
    assert not (users / "notes.txt").exists() and (users / "loraplex_merge.json").is_file()
    assert not [p for p in tmp.iterdir() if p.name.startswith(".")]  # no temporary or old copy left


def test_merge_on_a_full_disk_is_a_clean_error(base_and_adapter, capsys, monkeypatch):
    tmp, _ = base_and_adapter

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr("loraplex.outputs.os.fsync", full)
    assert _merge(tmp, tmp / "m") == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # (progress bars of the base load come before it)
    assert last.startswith("loraplex merge: error: cannot write") and "No space left" in last
    assert not (tmp / "m").exists() and not [p for p in tmp.iterdir() if p.name.startswith(".")]
