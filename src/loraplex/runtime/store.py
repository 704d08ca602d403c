"""An adapter store folder: one adapter directory per name, in PEFT's layout, read by the runtime on demand.

    <root>/
      legal/adapter_config.json  legal/adapter_model.safetensors
      tone/adapter_config.json   tone/adapter_model.safetensors

A name is the directory's name (1-64 characters of [A-Za-z0-9_-]); hidden entries (e.g. the temporary
directories of an atomic write in progress) are never listed. Identity is the content hash of what a
directory holds now (`content_hash`), so a version replaced on disk is never mistaken for the old one.
`put` writes atomically: a reader sees the old adapter or the new one, never a mix. These folder rules are
the only ones: the server's adapters (serve/adapters.py `ServedAdapters`) and evaluate's adapter folders
build on this class.

Example:
    store = AdapterStore("adapters/")
    store.put("legal", "runs/legal-v2/adapter")   # copy an adapter directory in, returns its content hash
    store.names()                                  # ['legal', 'tone']
    engine.load_from_store("legal")                # MultiLoraModel(..., store=store)
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import AdapterFileError, AdapterNotFoundError
from ..inject import check_name
from ..outputs import atomic_directory
from ..store import CONFIG_NAME, AdapterFile, PathLike, read_adapter


class AdapterStore:
    """Name -> adapter directory under `root` (which must exist; see the module docstring)."""

    def __init__(self, root: PathLike) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise AdapterFileError(
                f"adapter store {str(self.root)!r} is not a directory; create it, or pass the folder that "
                "holds one sub-directory per adapter"
            )

    def names(self) -> list[str]:
        """Sorted names of the adapter directories (those holding an adapter_config.json)."""
        return sorted(
            p.name for p in self.root.iterdir()
            if not p.name.startswith(".") and p.is_dir() and (p / CONFIG_NAME).is_file()
        )

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and not name.startswith(".") and (self.root / name / CONFIG_NAME).is_file()

    def path(self, name: str) -> Path:
        """The directory of adapter `name`; AdapterNotFoundError if the store has none."""
        check_name(name)
        if name not in self:
            raise AdapterNotFoundError(
                f"adapter {name!r} is not in the store {str(self.root)!r}; it holds {self.names()}"
            )
        return self.root / name

    def read(self, name: str) -> AdapterFile:
        """Read and verify adapter `name` (config, tensors, recorded content hash)."""
        return read_adapter(self.path(name))

    def content_hash(self, name: str) -> str:
        """The content hash of what `name` holds now (reads and hashes the tensors)."""
        return self.read(name).content_hash

    def put(self, name: str, source: PathLike, *, overwrite: bool = True) -> str:
        """Copy the adapter directory `source` into the store as `name` (atomically replacing an older one;
        with overwrite=False an existing `name` is refused: OutputExistsError).

        The source is verified first (read_adapter), so a broken adapter never enters the store; returns
        its content hash.
        """
        check_name(name)
        af = read_adapter(source)
        with atomic_directory(self.root / name, overwrite=overwrite) as tmp:
            for f in Path(source).iterdir():
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
        return af.content_hash

    def remove(self, name: str) -> None:
        """Delete adapter `name` from the store (engines that loaded it keep their copy in memory)."""
        shutil.rmtree(self.path(name))
