"""The server's adapters: the adapter folder (a `runtime.AdapterStore`) plus uploads, verification against
the serving model, and feeding one `runtime.AdapterPool`.

    DIR/legal/adapter_config.json + adapter_model.safetensors   ->  served as model "legal"

The folder rules (which entries are adapters, hidden ones skipped, paths, reads, atomic writes) are the
runtime store's (runtime/store.py); `ServedAdapters` adds what serving needs. Every route checks names with
`inject.check_name` ([A-Za-z0-9_-], 1-64 chars, the whole string) before any path is built, so a name can
never leave DIR and every name listed can be requested. Uploads are zip files of one adapter directory (the
two files, optionally a README.md, at the top level or inside one folder); they are size-limited, unpacked
by this module under names it chooses (never the archive's paths; only stored or deflated members; a
corrupt or encrypted archive is refused with AdapterFileError), verified with `store.read_adapter` and
against the base, and only then put into DIR/<name> (atomically, `AdapterStore.put`) and added to the pool.
An upload never overwrites DIR/<name> that exists (loaded or not) unless it says replace=true.

An adapter is verified before it is served: the base fingerprint, its tensors against the serving model's
projections, and its config's target_modules against its tensors (the modules the config targets in the
base must be exactly those it holds lora_A/lora_B for). At start-up a folder entry that fails any check is
skipped and reported (`load_all`, shown by /health); the others still serve. An evicted adapter whose files
vanished or changed fails the requests that need it (AdapterFileError) and is listed in `broken` until a
reload from disk succeeds again or it is loaded, replaced or removed by name.

An adapter file becomes pool tensors through `runtime.slots.pool_tensors` ({key: (A (r, in), B (out, r))}
and {key: scale}). A DoRA adapter (use_dora) also holds each module's magnitude m (out,); at load its
per-layer [g; c] is computed once from the base (runtime.rescale.dora_rescales) and its rows are served per
row like any other. A lora_bias adapter's biases b (out,) are kept per layer and added per row
(runtime.rowbias); modules_to_save copies of lm_head and the RMS norms run per row in the decoder
(runtime.saved_modules; a copy of any other module is refused at load).
"""

from __future__ import annotations

import io
import stat
import tempfile
import threading
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import (
    AdapterExistsError,
    AdapterFileError,
    AdapterNotFoundError,
    ConfigError,
    LoraplexError,
    RequestTooLargeError,
)
from ..identity import check_base
from ..inject import check_name, is_adapter_name
from ..runtime import AdapterPool, AdapterStore
from ..runtime.rescale import dora_rescales
from ..runtime.decoder import saved_places
from ..runtime.slots import PoolInput, pool_tensors
from ..store import CONFIG_NAME, WEIGHTS_NAME, AdapterFile, read_adapter, validate_adapter
from .metrics import Metrics

UPLOAD_FILES = (CONFIG_NAME, WEIGHTS_NAME, "README.md")


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    content_hash: str
    rank: int
    layers: int  # number of projections it adapts
    path: str


class ServedAdapters:
    """Loads, replaces and unloads the server's adapters (thread-safe; admin calls are serialized).

    directory: the adapter folder (None: uploads are refused; a folder that does not exist yet is made by
    the first upload)."""

    def __init__(self, directory: str | Path | None, pool: AdapterPool, base: nn.Module, *, reserved: set[str],
                 metrics: Metrics | None = None, max_upload_bytes: int = 64 << 20, check_base_model: bool = True):
        self.directory = Path(directory) if directory is not None else None
        self.pool = pool
        self.base = base
        self.reserved = reserved  # names adapters may not take (the base model's ids)
        self.metrics = metrics or Metrics()
        self.max_upload_bytes = max_upload_bytes
        self.check_base_model = check_base_model
        self._info: dict[str, AdapterInfo] = {}
        self._admin = threading.Lock()
        self._evictions_seen = 0
        self._resident: set[str] = set()
        self.broken: dict[str, str] = {}  # loaded adapters whose last reload from disk failed: name -> reason
        pool.loader = self._reload

    # ---- queries ------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(self._info)

    def info(self, name: str) -> AdapterInfo:
        if name not in self._info:
            raise AdapterNotFoundError(f"adapter {name!r} is not loaded; loaded: {self.names()}")
        return self._info[name]

    def available(self) -> list[str]:
        """Adapter directories in the folder (loaded or not) whose names can be served."""
        folder = self._folder()
        return [n for n in folder.names() if is_adapter_name(n)] if folder is not None else []

    def _folder(self, *, create: bool = False) -> AdapterStore | None:
        """The adapter folder (made first with create=True); None without one."""
        if self.directory is not None and create:
            self.directory.mkdir(parents=True, exist_ok=True)
        if self.directory is None or not self.directory.is_dir():
            return None
        return AdapterStore(self.directory)

    # ---- admin --------------------------------------------------------------------------------------------
    def load_all(self) -> tuple[list[str], dict[str, str]]:
        """Load every adapter directory in the folder; returns (loaded, {skipped name: reason}). A directory
        that fails any check (a typed loraplex error: bad name, unreadable, NaN/Inf, another base, ...) is
        skipped with its reason; the others still load."""
        loaded, skipped = [], {}
        folder = self._folder()
        for name in folder.names() if folder is not None else []:
            try:
                self.load(name)
                loaded.append(name)
            except LoraplexError as exc:  # report it; the others still serve
                skipped[name] = f"{type(exc).__name__}: {exc}"
        return loaded, skipped

    def load(self, name: str, *, replace: bool = False) -> AdapterInfo:
        """Load DIR/<name> as adapter `name` (replace=True swaps a loaded one in place)."""
        self._check_new(name, replace)
        if self.directory is None:
            raise ConfigError("this server has no adapter folder (--adapters); upload the adapter instead")
        folder = self._folder()
        if folder is None or name not in folder:
            raise AdapterNotFoundError(f"no adapter directory {name!r} in the adapter folder; "
                                       f"available: {self.available()}")
        with self._admin:
            self._check_new(name, replace)
            return self._add(name, folder.read(name))

    def upload(self, name: str, data: bytes, *, replace: bool = False) -> AdapterInfo:
        """Install a zipped adapter directory as DIR/<name> and load it (see the module docstring)."""
        self._check_new(name, replace)
        if len(data) > self.max_upload_bytes:
            raise RequestTooLargeError(f"upload is {len(data)} bytes; the limit is {self.max_upload_bytes}")
        if self.directory is None:
            raise ConfigError("this server has no adapter folder (--adapters) to install uploads into")
        with self._admin:
            self._check_new(name, replace)
            if (self.directory / name).exists() and not replace:
                raise AdapterExistsError(f"the adapter folder already holds {name!r} (not loaded); pass replace=true "
                                         "to overwrite its files, load it as it is with JSON {\"name\": ...}, or "
                                         "upload under another name")
            folder = self._folder(create=True)
            with tempfile.TemporaryDirectory(prefix=".upload-", dir=self.directory) as tmp:  # hidden: never listed
                _unzip(data, Path(tmp), self.max_upload_bytes)
                af = read_adapter(tmp)
                verified = self._verify(af)
                folder.put(name, tmp, overwrite=replace)
            af.path = folder.path(name)
            return self._add(name, af, verified=verified)

    def remove(self, name: str) -> None:
        """Unload `name` (its files stay); requests already running on it finish on their lease."""
        check_name(name)
        with self._admin:
            if name not in self._info:
                raise AdapterNotFoundError(f"adapter {name!r} is not loaded; loaded: {self.names()}")
            self.pool.remove(name)
            del self._info[name]
            self._resident.discard(name)
            self.broken.pop(name, None)

    def poll_evictions(self) -> None:
        """Count per-adapter evictions since the last call (the pool keeps only a total)."""
        total = self.pool.stats.evictions
        if total == self._evictions_seen:
            self._resident = {n for n in self._info if n in self.pool and self.pool.is_resident(n)}
            return
        self._evictions_seen = total
        now = {n for n in list(self._info) if n in self.pool and self.pool.is_resident(n)}
        for n in self._resident - now:
            self.metrics.adapter_evicted(n)
        self._resident = now

    # ---- internals ----------------------------------------------------------------------------------------
    def _check_new(self, name: str, replace: bool) -> None:
        check_name(name)
        if name in self.reserved:
            raise AdapterExistsError(f"{name!r} is the base model's id; pick another adapter name")
        if name in self._info and not replace:
            raise AdapterExistsError(f"adapter {name!r} is already loaded; pass replace=true to swap it in place "
                                     "(running requests finish on the old version)")

    def _verify(self, af: AdapterFile) -> PoolInput:
        if self.check_base_model:
            check_base(af.base_fingerprint, self.base, f"adapter {str(af.path)!r}")
        validate_adapter(af, self.base)  # targets vs tensors, shapes: the check every reader shares
        return pool_tensors(af, self.pool.layers, self._module, saved_places(self.base), base=self.base)

    def _add(self, name: str, af: AdapterFile, verified: PoolInput | None = None) -> AdapterInfo:
        tensors, scales, bias, copies = verified or self._verify(af)
        dora = dora_rescales(af, tensors, scales, self._base_layer)
        self.pool.add(name, af.content_hash, tensors, scales, dora, bias, copies)
        info = AdapterInfo(name, af.content_hash, af.config.r, len(tensors), str(af.path))
        self._info[name] = info
        self.broken.pop(name, None)
        self.metrics.adapter_loaded(name)
        self.poll_evictions()
        return info

    def _base_layer(self, key: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W (out, in), bias or None) of the base's projection `key` (the server never merges into it)."""
        module = self.base.get_submodule(key)
        return module.weight, module.bias

    def _module(self, key: str) -> nn.Module | None:
        """The base's module `key`, or None (for checking modules_to_save copies)."""
        try:
            return self.base.get_submodule(key)
        except AttributeError:
            return None

    def _reload(self, name: str, content_hash: str) -> PoolInput:
        """AdapterPool loader: read the adapter back from disk after an eviction (same content only)."""
        info = self._info.get(name)
        if info is None or info.content_hash != content_hash:
            raise AdapterFileError(f"adapter {name!r} version {content_hash[:12]} is no longer on disk")
        try:
            folder = self._folder()
            if folder is None:
                raise AdapterFileError(f"the adapter folder {str(self.directory)!r} is gone")
            af = folder.read(name)
            if af.content_hash != content_hash:
                raise AdapterFileError(f"adapter directory {info.path!r} changed on disk since it was loaded "
                                       f"({content_hash[:12]} -> {af.content_hash[:12]}); load it again by name "
                                       "with replace=true")
            loaded = pool_tensors(af, self.pool.layers, self._module, saved_places(self.base), base=self.base)
        except LoraplexError as exc:  # marked until a reload succeeds; the pool fails the request that needed it
            self.broken[name] = f"reloading after an eviction failed: {exc}"
            raise
        self.broken.pop(name, None)
        return loaded


def _unzip(data: bytes, dest: Path, limit: int) -> None:
    """Unpack a zipped adapter directory into `dest` under fixed file names (no archive path is ever used)."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise AdapterFileError(f"the upload is not a zip archive ({exc}); send a zip of the adapter directory") from None
    with zf:
        files = [i for i in zf.infolist() if not i.is_dir()]
        tops = set()
        for i in files:
            parts = i.filename.replace("\\", "/").split("/")
            mode = i.external_attr >> 16
            if (i.filename.startswith(("/", "\\")) or ".." in parts or len(parts) > 2 or stat.S_ISLNK(mode)
                    or parts[-1] not in UPLOAD_FILES):
                raise AdapterFileError(f"the upload holds {i.filename!r}; expected only {list(UPLOAD_FILES)} at the "
                                       "top level or inside one folder (no links, no other paths)")
            tops.add(parts[0] if len(parts) == 2 else "")
        names = [i.filename.replace("\\", "/").split("/")[-1] for i in files]
        if len(tops) > 1 or len(set(names)) != len(names):
            raise AdapterFileError(f"the upload must hold exactly one adapter directory; got {sorted(i.filename for i in files)}")
        total = sum(i.file_size for i in files)
        if total > limit:
            raise RequestTooLargeError(f"the upload unpacks to {total} bytes; the limit is {limit}")
        for i in files:
            if i.flag_bits & 0x1:
                raise AdapterFileError(f"{i.filename!r} in the upload is encrypted; send an unencrypted zip")
            if i.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise AdapterFileError(f"{i.filename!r} in the upload uses zip compression method {i.compress_type}; "
                                       "expected stored (0) or deflated (8), what `zip` writes by default")
        left = limit
        for i, n in zip(files, names):
            try:
                with zf.open(i) as src:
                    blob = src.read(left + 1)  # a member's header may understate its size: bound what is read
            except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
                raise AdapterFileError(f"{i.filename!r} in the upload is corrupt ({exc}); "
                                       "zip the adapter directory again") from None
            if len(blob) > left:
                raise RequestTooLargeError(f"the upload unpacks past the limit of {limit} bytes (at {n})")
            left -= len(blob)
            (dest / n).write_bytes(blob)
