"""Training checkpoints, written atomically, and resuming from them.

Layout (every file written inside a temporary directory that replaces DIR/checkpoint in one rename):

    DIR/checkpoint/
      state.json            {"step": 40, "world_size": 1, "metrics_lines": 41, "identity": {...},
                             "jobs": {"default": {"steps_done": 40, "batcher": {Batcher.state_dict()}}}}
      trainer.pt            {"optimizers": {name: state_dict}, "schedulers": {name: state_dict},
                             "rng": [per rank: {"torch": ByteTensor, "cuda": [...], "python": random state}]}
      adapters/<name>/      each adapter as a normal adapter directory (usable on its own)

A crash while a checkpoint is written leaves the previous one in place: the new one is built beside it
and swapped in by outputs.atomic_directory, which renames the old one to `.checkpoint.old-<id>` for the
instant between its two renames; `find_checkpoint` falls back to that name, so even a kill inside that
window resumes from the previous checkpoint.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..outputs import atomic_directory, write_json
from ..store import save_adapter

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.json"
TRAINER_FILE = "trainer.pt"


@dataclass
class Checkpoint:
    """A checkpoint read back: where it is, its state.json, and the tensors of trainer.pt."""

    path: Path
    state: dict[str, Any]
    trainer: dict[str, Any]

    def adapter_dir(self, name: str) -> Path:
        return self.path / "adapters" / name


def rng_state() -> dict[str, Any]:
    """Every random state the loop may draw from: torch (CPU; CUDA when present; dropout masks) and
    Python's `random`. numpy is never used by the loop, so it is not saved."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    """random.setstate needs tuples; a save/load round trip may hand back lists."""
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_checkpoint(out_dir: str | Path, *, model: torch.nn.Module, adapters: list[str], state: dict[str, Any],
                    optimizers: dict[str, dict[str, Any]], schedulers: dict[str, Any], rng: list[dict[str, Any]],
                    base_name: str | None = None, fingerprint: dict[str, Any] | None = None) -> Path:
    """Write DIR/checkpoint atomically (see the module doc); returns its path. `state` is JSON-ready.
    `optimizers`: each adapter's optimizer state dict. `fingerprint`: the base fingerprint the adapters record (None: computed from `model`)."""
    target = Path(out_dir) / CHECKPOINT_DIR
    with atomic_directory(target, overwrite=True) as tmp:  # replaces the previous checkpoint
        for name in adapters:
            save_adapter(model, name, tmp / "adapters" / name, base_name=base_name, fingerprint=fingerprint)
        trainer = {"optimizers": optimizers,
                   "schedulers": {n: s.state_dict() for n, s in schedulers.items()}, "rng": rng}
        torch.save(trainer, tmp / TRAINER_FILE)
        write_json(tmp / STATE_FILE, state)  # last: a directory with state.json is complete
    for stale in Path(out_dir).glob(f".{CHECKPOINT_DIR}.old-*"):  # left by a kill inside an earlier swap
        shutil.rmtree(stale, ignore_errors=True)
    return target


def find_checkpoint(out_dir: str | Path) -> Path | None:
    """DIR/checkpoint if complete, else the previous checkpoint left by a kill between atomic_directory's
    two renames (see the module doc), else None."""
    out = Path(out_dir)
    main = out / CHECKPOINT_DIR
    if (main / STATE_FILE).is_file():
        return main
    stale = [p for p in out.glob(f".{CHECKPOINT_DIR}.old-*") if (p / STATE_FILE).is_file()]
    return max(stale, key=lambda p: p.stat().st_mtime) if stale else None


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    try:
        state = json.loads((path / STATE_FILE).read_text())
        trainer = torch.load(path / TRAINER_FILE, map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError) as exc:  # unreadable JSON / pickle: the file is damaged
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read ({exc}); remove it to start over") from None
    for key in ("step", "world_size", "metrics_lines", "identity", "jobs"):
        if key not in state:
            raise CheckpointError(f"checkpoint {str(path)!r}: {STATE_FILE} lacks {key!r}; remove it to start over")
    return Checkpoint(path, state, trainer)


def check_compatible(ckpt: Checkpoint, identity: dict[str, Any], world_size: int) -> None:
    """Refuse to resume a checkpoint made by a different run (settings that change the result)."""
    saved = ckpt.state["identity"]
    diff = sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))
    if diff:
        shown = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {identity.get(k)!r}" for k in diff[:6])
        raise CheckpointError(f"checkpoint {str(ckpt.path)!r} was made with other settings ({shown}); resume "
                              "with the original settings, or start over in a fresh --out directory")
    if ckpt.state["world_size"] != world_size:
        raise CheckpointError(f"checkpoint {str(ckpt.path)!r} was made by {ckpt.state['world_size']} process(es), "
                              f"this run has {world_size}; resume with the same --nproc-per-node")
