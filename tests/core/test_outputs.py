"""The one overwrite rule of every writer (outputs.check_output / atomic_directory / atomic_file): what may be
replaced, atomicity on failure (disk full), the user's umask, and cleanup of a killed writer's temporaries."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import loraplex.outputs as outputs
from loraplex.errors import LoraplexError, OutputExistsError, WriteError
from loraplex.outputs import atomic_directory, write_json
from loraplex.train.sources import Record, write_jsonl

STATES = ["absent", "empty dir", "full dir", "file"]


def make(path: Path, state: str) -> None:
    if state == "empty dir":
        path.mkdir()
    elif state == "full dir":
        path.mkdir()
        (path / "user.txt").write_text("the user's file")
    elif state == "file":
        path.write_text("the user's file")


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under root (hidden ones too) with file contents: the whole observable state."""
    return {str(p.relative_to(root)): (p.read_text() if p.is_file() else "<dir>") for p in sorted(root.rglob("*"))}


@settings(max_examples=60, deadline=None)
@given(state=st.sampled_from(STATES), overwrite=st.booleans(),
       relation=st.sampled_from(["none", "is input", "holds input"]), fail=st.booleans())
def test_directory_writer_follows_the_overwrite_rule(state, overwrite, relation, fail):
    """Written iff (absent or empty, or overwrite) and the output neither is nor holds an input; otherwise
    OutputExistsError. A failure mid-write (disk full) is a WriteError. Refused or failed: nothing changed."""
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        out = root / "out"
        make(out, state)
        inputs = {"none": [root / "elsewhere"], "is input": [out], "holds input": [out / "user.txt"]}[relation]
        before = snapshot(root)
        refused = relation != "none" or (state in ("full dir", "file") and not overwrite)
        expected = OutputExistsError if refused else WriteError if fail else None
        try:
            with atomic_directory(out, overwrite=overwrite, inputs=inputs) as tmp:
                (tmp / "new.txt").write_text("new")
                if fail:
                    raise OSError(errno.ENOSPC, "No space left on device")
        except LoraplexError as exc:
            assert type(exc) is expected, exc
            assert snapshot(root) == before  # untouched, no temporary left
            return
        assert expected is None
        assert snapshot(root) == {"out": "<dir>", "out/new.txt": "new"}  # replaced whole, nothing hidden left


@pytest.mark.parametrize("state", ["absent", "file"])
def test_file_writer_on_disk_full_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch, state):
    target = tmp_path / "results.json"
    make(target, state)
    before = snapshot(tmp_path)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(outputs.os, "fsync", full)
    with pytest.raises(WriteError, match="results.json.*No space left"):
        write_json(target, {"a": 1}, overwrite=True)
    assert snapshot(tmp_path) == before


def test_file_writer_refuses_an_existing_file_or_a_directory(tmp_path):
    target = tmp_path / "r.json"
    write_json(target, {"v": 1})
    with pytest.raises(OutputExistsError, match="--overwrite"):
        write_json(target, {"v": 2})
    assert '"v": 1' in target.read_text()
    write_json(target, {"v": 2}, overwrite=True)
    assert '"v": 2' in target.read_text()
    with pytest.raises(OutputExistsError, match="is a directory"):
        write_json(tmp_path, {"v": 3}, overwrite=True)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_get_the_users_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        with atomic_directory(tmp_path / "adapter") as tmp:
            write_json(tmp / "adapter_config.json", {})
        write_json(tmp_path / "results.json", {})
        write_jsonl([Record(text="t")], tmp_path / "data.jsonl")
    finally:
        os.umask(old)
    assert (tmp_path / "adapter").stat().st_mode & 0o777 == 0o777 & ~umask
    for f in (tmp_path / "adapter" / "adapter_config.json", tmp_path / "results.json", tmp_path / "data.jsonl"):
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask


def test_writer_removes_a_killed_writers_temporaries_but_not_a_running_ones(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = [tmp_path / ".mix.tmp-3f2a9c1d", tmp_path / f".mix.tmp-{dead.pid}-0badc0de"]  # older scheme; dead pid
    running = tmp_path / f".mix.tmp-{os.getpid()}-00000000"  # a writer still at work (this process)
    other = tmp_path / ".other.tmp-3f2a9c1d"  # another target's: not ours to judge
    for p in [*stale, running, other]:
        p.mkdir()
        (p / "adapter_config.json").write_text("{}")
    with atomic_directory(tmp_path / "mix") as tmp:
        (tmp / "f").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["mix", running.name, other.name])
