"""Atomic outputs under one overwrite rule: every file or directory loraplex writes goes through here.

    with atomic_directory("out/adapter") as tmp:   # write into tmp; on success it takes out/adapter's place
        save_file(tensors, tmp / "adapter_model.safetensors")
    write_json("out/summary.json", {...})          # atomic_file + json.dump; refuses to replace without overwrite
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Union

from .errors import LoraplexError, OutputExistsError, WriteError

PathLike = Union[str, os.PathLike]


# -- atomic outputs ------------------------------------------------------------------------------------------
# The one overwrite rule (docs/concepts.md, "Overwrite rules"): a path that does not exist, or an empty directory,
# is written; anything else there (a file, a non-empty directory) is replaced only with overwrite=True, and then
# atomically: the old content stays until the new one is complete. An output that is, or contains, one of the
# call's inputs is refused even with overwrite. Work happens in a hidden sibling `.NAME.tmp-<pid>-<id>` made
# with the user's umask; a writer removes such leftovers of dead processes when it starts, and every reader that
# lists adapter folders skips names starting with '.'.
def check_output(path: PathLike, *, overwrite: bool = False, inputs: Iterable[PathLike] = ()) -> Path:
    """`path` as a Path if the overwrite rule lets a writer replace it; else OutputExistsError."""
    target = Path(path)
    where = target.resolve()
    for item in inputs:
        src = Path(item).resolve()
        if src == where or where in src.parents:
            held = "is" if src == where else "contains"
            raise OutputExistsError(f"output {str(target)!r} {held} the input {str(item)!r}; inputs are never "
                                    "replaced, even with --overwrite: write the output elsewhere")
    if overwrite or not (target.exists() or target.is_symlink()):
        return target
    if target.is_dir() and not any(target.iterdir()):
        return target
    what = "a non-empty directory" if target.is_dir() else "a file"
    raise OutputExistsError(f"output {str(target)!r} already exists ({what}); pass --overwrite (overwrite=True) to "
                            "replace it, or choose another path")


@contextlib.contextmanager
def atomic_directory(path: PathLike, *, overwrite: bool = False, inputs: Iterable[PathLike] = ()) -> Iterator[Path]:
    """Yield a fresh hidden directory beside `path`; on success it takes `path`'s place (the old content, allowed
    by the overwrite rule above, is removed only after the new one is in place). On error the temporary
    directory is deleted and `path` untouched; an OSError (disk full, read-only) becomes WriteError."""
    inputs = list(inputs)
    target = check_output(path, overwrite=overwrite, inputs=inputs)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _clean_stale(target)
        tmp = _temp_sibling(target)
        os.mkdir(tmp)  # mode 0o777 & ~umask, like any folder the user makes (mkdtemp would give 0o700)
    except OSError as exc:
        raise _write_error(target, exc) from exc
    old = None
    try:
        yield tmp
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        check_output(target, overwrite=overwrite, inputs=inputs)  # again: something may have appeared meanwhile
        if target.exists() or target.is_symlink():
            old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(target, old)
        os.rename(tmp, target)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and old is not None and not (target.exists() or target.is_symlink()):
            os.rename(old, target)  # the second rename failed: put the old content back
        if isinstance(exc, OSError) and not isinstance(exc, LoraplexError):
            raise _write_error(target, exc) from exc
        raise
    if old is not None:
        _remove(old)


@contextlib.contextmanager
def atomic_file(path: PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a hidden temporary path beside file `path` to write; on success it replaces `path` (os.replace)
    under the overwrite rule above. On error the temporary file is removed and `path` untouched; an OSError
    (disk full, read-only) becomes WriteError."""
    target = Path(path)
    if target.is_dir():
        raise OutputExistsError(f"output {str(target)!r} is a directory; give a file path")
    check_output(target, overwrite=overwrite)
    tmp = _temp_sibling(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _clean_stale(target)
        yield tmp
        os.replace(tmp, target)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, LoraplexError):
            raise _write_error(target, exc) from exc
        raise


def _temp_sibling(target: Path) -> Path:
    return target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _clean_stale(target: Path) -> None:
    """Remove `.NAME.tmp-<pid>-*` siblings whose process is gone (a killed writer's), and `.NAME.old-*` ones
    once NAME itself exists (a kill between atomic_directory's two renames leaves the old version there)."""
    for p in target.parent.glob(f".{glob.escape(target.name)}.tmp-*"):
        if not _writer_alive(p.name[len(target.name) + 6:]):
            _remove(p)
    if target.exists():
        for p in target.parent.glob(f".{glob.escape(target.name)}.old-*"):
            _remove(p)


def _writer_alive(suffix: str) -> bool:
    """Whether the process named by a temp suffix '<pid>-<id>' still runs (this process counts as running)."""
    pid = suffix.partition("-")[0]
    if not pid.isdigit():
        return False  # not made by this scheme (e.g. an older loraplex): nobody owns it any more
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def _write_error(target: Path, exc: OSError) -> WriteError:
    reason = f"{exc.strerror} [{errno.errorcode.get(exc.errno, exc.errno)}]" if exc.strerror else str(exc)
    return WriteError(f"cannot write {str(target)!r}: {reason}; nothing was written there (what it held before is "
                      "unchanged): free disk space or choose a writable path")


def write_json(path: PathLike, data: Any, *, overwrite: bool = False) -> Path:
    """Write JSON atomically (atomic_file; an existing file is replaced only with overwrite); returns the path."""
    with atomic_file(path, overwrite=overwrite) as tmp:
        with open(tmp, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=True, default=str)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
    return Path(path)


def write_png(fig: Any, path: PathLike, *, overwrite: bool = False) -> Path:
    """Save a matplotlib Figure as PNG atomically (atomic_file; an existing file is replaced only with
    overwrite); returns the path."""
    with atomic_file(path, overwrite=overwrite) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)
