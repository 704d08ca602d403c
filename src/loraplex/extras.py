"""Optional dependencies ("extras"): the core API (inject, load, save, merge, train) imports none of them.

    serve   fastapi, uvicorn    `loraplex serve`, loraplex.serve.app
            prometheus_client   its /metrics
    plot    matplotlib          train's loss.png, `loraplex eval --plot`
    bitsandbytes                quantize(..., backend="bitsandbytes"): NF4 kernels (quant/backends.py)
    torchao                     quantize(..., backend="torchao"): int8 weight-only kernels

Code that needs an extra calls `require(extra)` before importing its modules, so a missing one is a
MissingDependencyError that says what to install, not a bare ModuleNotFoundError deep in a command.
"""

from __future__ import annotations

import importlib
import importlib.util

from .errors import MissingDependencyError

EXTRAS: dict[str, tuple[str, ...]] = {"serve": ("fastapi", "uvicorn", "prometheus_client"), "plot": ("matplotlib",),
                                      "bitsandbytes": ("bitsandbytes",), "torchao": ("torchao",)}


def available(extra: str) -> bool:
    """True when every module of `extra` can be found (nothing is imported)."""
    return all(importlib.util.find_spec(module) is not None for module in EXTRAS[extra])


def require(extra: str, purpose: str) -> None:
    """Import every module of `extra`, or raise MissingDependencyError naming `purpose` and the pip command."""
    for module in EXTRAS[extra]:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise MissingDependencyError(
                f"{purpose} needs {module!r}, which cannot be imported ({exc}); install the {extra!r} extra: "
                f"pip install 'loraplex[{extra}]'") from exc
