"""Hugging Face model ids, resolved from the local Hugging Face cache only (nothing is ever downloaded).

Cache layout (huggingface_hub's; $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub):
    models--org--name/refs/main                   the commit of the main branch, e.g. 0c0c...0c
    models--org--name/snapshots/<commit>/<file>   symlinks into blobs/
    models--org--name/blobs/<sha256>
`load_base("org/name")` loads snapshots/<refs/main>/; a model from there is named "org/name", not <commit>.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import BaseModelError

# $HF_HUB_CACHE/models--org--name/snapshots/<commit>/ (huggingface_hub's layout; ids never contain "--")
_SNAPSHOT_DIR = re.compile(r"(?:^|/)models--(?P<folder>[^/]+)/snapshots/[^/]+$")


def is_repo_id(spec: str) -> bool:
    """True when `spec` is a valid Hugging Face repo id ("name" or "org/name"; huggingface_hub's rules)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(spec)
    except HFValidationError:
        return False
    return True


def hub_snapshot(repo_id: str, *, otherwise: str = "a local model directory") -> Path:
    """The snapshot directory of model `repo_id` ("org/name") in the local Hugging Face cache ($HF_HUB_CACHE,
    else $HF_HOME/hub, else ~/.cache/huggingface/hub): the commit refs/main names, read with
    local_files_only=True (as under HF_HUB_OFFLINE=1). Raises BaseModelError naming the cache directory
    when it holds no complete snapshot of `repo_id` (and `otherwise`: what else the caller accepts)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError) as exc:
        folder = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
        raise BaseModelError(
            f"base {repo_id!r} is not a local directory, and the Hugging Face cache holds no snapshot of it "
            f"(looked in {folder}: {exc}); loraplex never downloads: fetch it once (e.g. `hf download "
            f"{repo_id}`), set HF_HUB_CACHE to the cache that holds it, or pass {otherwise}") from exc


def hub_id_of(path: Path) -> str | None:
    """The model id of a directory inside a Hugging Face cache snapshot (.../models--org--name/snapshots/<commit>
    -> "org/name"), else None."""
    match = _SNAPSHOT_DIR.search(Path(path).as_posix())
    return match.group("folder").replace("--", "/") if match else None
