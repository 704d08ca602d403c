"""One typed error hierarchy for loraplex.

Every error says what was expected, what was got, and (where possible) how to fix it.
Each subclass also inherits the matching builtin (ValueError, KeyError, ...) so callers that
catch builtins keep working. The HTTP layer maps these classes to status codes in one place.
"""

from __future__ import annotations


class LoraplexError(Exception):
    """Base class of every error raised on purpose by loraplex."""


class ConfigError(LoraplexError, ValueError):
    """A LoraConfig (or a CLI option feeding one) holds an invalid value."""


class UsageError(ConfigError):
    """A command-line flag value the command cannot use, found after argparse accepted it (the CLI exits 2,
    as for argparse's own usage errors)."""


class DeviceError(ConfigError):
    """A --device that is malformed or not present on this machine (loraplex.device)."""


class UnsupportedFeatureError(LoraplexError, ValueError):
    """A file or config asks for a feature whose semantics loraplex does not implement (e.g. DoRA)."""


class TargetNotFoundError(LoraplexError, KeyError):
    """A target module named by a config or an adapter file does not exist in the base model."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class UnsupportedModuleError(LoraplexError, TypeError):
    """A matched module has a type LoRA cannot wrap (only Linear, Embedding, Conv1d/2d, GPT-2 Conv1D)."""


class AdapterNotFoundError(LoraplexError, KeyError):
    """An adapter name is not loaded (or not in the adapter store)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class AdapterExistsError(LoraplexError, ValueError):
    """An adapter name is already taken on this model."""


class AdapterFileError(LoraplexError, OSError):
    """An adapter directory is missing files or holds unreadable/corrupt data."""


class ShapeMismatchError(LoraplexError, ValueError):
    """Adapter tensors do not fit the base module they target."""


class BaseMismatchError(LoraplexError, ValueError):
    """An adapter was made for a different base model (fingerprint mismatch)."""


class NonFiniteError(LoraplexError, ArithmeticError):
    """NaN/Inf found in adapter weights or in a merge result."""


class MergeStateError(LoraplexError, RuntimeError):
    """A merge/unmerge request contradicts the layer's current state (e.g. unmerging what is not merged)."""


class QuantConfigError(LoraplexError, ValueError):
    """A quantization option is invalid (scheme, block size, dtype), or a saved quantized model's
    quantization config does not match what the caller asks for."""


class QuantFileError(LoraplexError, OSError):
    """A quantized-model directory is missing files or holds unreadable/inconsistent data."""


class DataError(LoraplexError, ValueError):
    """Training data is unreadable or malformed (bad JSONL record, unknown built-in source, bad template)."""


class BaseModelError(LoraplexError, OSError):
    """A base model spec names no loadable model (missing path, not a model directory, unknown name)."""


class PoolFullError(LoraplexError, MemoryError):
    """An adapter pool's memory budget cannot hold what is asked: the adapter is larger than the budget, or
    every adapter that could be evicted is leased (in use by a request) or has nowhere to be evicted to."""


class LeaseError(LoraplexError, RuntimeError):
    """A lease on a pooled adapter was released twice, or does not belong to this pool."""


class IncompatibleAdaptersError(LoraplexError, ValueError):
    """Adapters cannot be combined as asked: they target different modules (without union), or the method
    needs something they do not share (e.g. 'linear' needs equal ranks per module)."""


class CheckpointError(LoraplexError, OSError):
    """A training checkpoint is unreadable, incomplete, or was made by a run with other settings."""


class OutputExistsError(LoraplexError, FileExistsError):
    """An output path already holds something the call was not told to replace (pass overwrite / --overwrite),
    or it is (or contains) one of the call's own inputs, which is never replaced."""


class WriteError(LoraplexError, OSError):
    """Writing an output failed (disk full, read-only or unwritable folder); nothing partial was left and an
    earlier version at that path is intact."""


class ParityError(LoraplexError, RuntimeError):
    """A merged deployment does not compute what base + adapter on the fly computes (within tolerance)."""


# -- serving (loraplex.serve maps every class here to an HTTP status in serve/errors.py) -------------------
class RequestTooLargeError(LoraplexError, ValueError):
    """A request or upload exceeds a configured size limit (prompt tokens, upload bytes)."""


class QueueFullError(LoraplexError, RuntimeError):
    """The serving engine's waiting queue is at its configured length; retry later."""


class ShuttingDownError(LoraplexError, RuntimeError):
    """The serving engine is draining for shutdown (or has stopped) and takes no new requests."""


class RequestTimeoutError(LoraplexError, TimeoutError):
    """A request did not finish within its time limit (queue wait included)."""


class UnauthorizedError(LoraplexError, PermissionError):
    """An admin operation was asked without the right API key (or with admin routes disabled)."""


class MissingDependencyError(LoraplexError, ImportError):
    """A command needs an optional dependency that is not installed; the message names the extra to install
    (e.g. pip install 'loraplex[serve]')."""
