"""The engine's changes to the base model's module tree (loraplex.runtime.model), in one place.

A target module is replaced, once, by its runtime wrapper (`RuntimeLinear`, or `RuntimeEmbedding` for an
nn.Embedding) that reads the engine's current plan; a module some adapter holds a modules_to_save copy of is
replaced by a `RuntimeModulesToSave`. `place(bare=True)` puts the originals back (for `unwrap`, or while the
compact decoder reads plain projections) and `place(bare=False)` the wrappers again. A module is either adapted
or copied, never both (`check_copies`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional, Union

import torch
import torch.nn as nn

from ..config import LoraConfig
from ..errors import ShapeMismatchError, TargetNotFoundError, UnsupportedFeatureError
from ..inject import find_targets
from .embedding import RuntimeEmbedding
from .pool import AdapterPool
from .saved_modules import RuntimeModulesToSave
from .wrapper import CurrentPlan, RuntimeLinear, wrappable_features

LayerTensors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module name -> (A (r, in), B (out, r))


class ModuleTree:
    """The wrapped and copied modules of one engine's base model (see the module docstring).

    target_modules: modules to wrap now (LoraConfig syntax); None = wrap lazily what loaded adapters target.
    Every wrapped layer is registered with `pool` (its (in, out) features; embeddings as embedding layers).
    """

    def __init__(self, model: nn.Module, pool: AdapterPool, current: CurrentPlan,
                 target_modules: Union[list[str], str, None]) -> None:
        self.model, self.pool, self.current = model, pool, current
        self.target_modules = target_modules
        self.wrapped: dict[str, Union[RuntimeLinear, RuntimeEmbedding]] = {}
        self.copied: dict[str, RuntimeModulesToSave] = {}  # modules some adapter holds modules_to_save copies of
        if target_modules is not None:
            keys = find_targets(model, LoraConfig(target_modules=target_modules))
            modules = dict(model.named_modules())
            shapes = {k: features(modules[k]) for k in keys}
            for k in keys:
                self.wrap(k, modules[k], shapes[k])

    def wrap(self, key: str, module: nn.Module, shape: tuple[int, int]) -> None:
        """Replace module `key` by its runtime wrapper; shape: `features(module)`."""
        embedding = isinstance(module, nn.Embedding)
        self.pool.register_layer(key, *shape, embedding=embedding)
        wrapper = (RuntimeEmbedding(module, key, self.current) if embedding
                   else RuntimeLinear(module, key, *shape, self.current))
        self.set_module(key, wrapper)
        self.wrapped[key] = wrapper

    def wrap_targets(self, name: str, tensors: LayerTensors) -> None:
        """Wrap the modules adapter `name` targets that are not wrapped yet (all checked before any is): refused
        when the engine wraps a fixed `target_modules`, or when a module is missing or of another shape."""
        new = [k for k in tensors if k not in self.wrapped]
        if not new:
            return
        if self.target_modules is not None:
            raise TargetNotFoundError(
                f"adapter {name!r} targets {new[:3]}{'...' if len(new) > 3 else ''}, which this engine did not "
                f"wrap (target_modules={self.target_modules!r}); build the engine with target_modules covering "
                "them (e.g. 'all-linear'), or with target_modules=None to wrap lazily"
            )
        modules = dict(self.model.named_modules())
        shapes = {}
        for k in new:  # check everything before changing the model
            if k not in modules:
                raise TargetNotFoundError(f"adapter {name!r} targets module {k!r}, which this base does not have")
            shapes[k] = features(modules[k])
            A, B = tensors[k]
            if (A.shape[1], B.shape[0]) != shapes[k]:
                raise ShapeMismatchError(
                    f"adapter {name!r} at {k!r}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} do not fit a "
                    f"({shapes[k][0]} -> {shapes[k][1]}) layer (adapter made for another base?)"
                )
        for k in new:
            self.wrap(k, modules[k], shapes[k])

    def check_copies(self, name: str, tensors: LayerTensors, copies: Mapping[str, object]) -> None:
        """Refuse a module that would be both a LoRA target and a modules_to_save copy (of any adapters): a copy
        runs a subset of the batch's rows, which a LoRA wrapper inside it cannot serve."""
        lora = [*self.wrapped, *tensors]
        copied = [*self.copied, *copies]
        clash = [(c, k) for c in copied for k in lora if k == c or k.startswith(c + ".")]
        if clash:
            raise UnsupportedFeatureError(
                f"adapter {name!r}: module {clash[0][0]!r} is a modules_to_save copy and {clash[0][1]!r} a LoRA "
                "target of the adapters of this engine; the runtime serves a module either copied or adapted. "
                "Serve these adapters on separate engines (or with loraplex.load_adapter)")

    def copy(self, keys: Mapping[str, object]) -> None:
        """Put a RuntimeModulesToSave in place of each module in `keys` that has none yet."""
        for key in keys:
            if key not in self.copied:
                self.copied[key] = RuntimeModulesToSave(self.base_module(key), key, self.current)
                self.set_module(key, self.copied[key])

    def base_module(self, key: str) -> Optional[nn.Module]:
        """The base's module `key` (the original under a runtime wrapper), or None if there is none."""
        try:
            module = self.model.get_submodule(key)
        except AttributeError:
            return None
        if isinstance(module, (RuntimeLinear, RuntimeEmbedding)):
            return module.base_layer  # a LoRA target: a copy of it is refused by check_copies, with its reason
        return module.original_module if isinstance(module, RuntimeModulesToSave) else module

    def place(self, *, bare: bool) -> None:
        """Put each wrapped module's base layer and each copied module's original (bare=True), or their runtime
        wrappers (bare=False), in the model."""
        for key, wrapper in self.wrapped.items():
            self.set_module(key, wrapper.base_layer if bare else wrapper)
        for key, copied in self.copied.items():
            self.set_module(key, copied.original_module if bare else copied)

    def unwrap(self) -> None:
        """Put the original modules back and forget the wrappers."""
        self.place(bare=True)
        self.wrapped.clear()
        self.copied.clear()

    def set_module(self, key: str, module: nn.Module) -> None:
        parent, _, child = key.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, child, module)


def features(module: nn.Module) -> tuple[int, int]:
    """(in, out) of a module the engine wraps: (num_embeddings, embedding_dim) for an nn.Embedding."""
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    return wrappable_features(module)
