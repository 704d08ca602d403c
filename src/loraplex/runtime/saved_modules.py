"""modules_to_save copies (PEFT's full per-adapter copies of whole modules, e.g. lm_head, a norm, score), per row.

An adapter with modules_to_save holds, for each such module M of the base, a full copy of M's state dict; PEFT
runs that copy instead of M while the adapter is active. Per row (the runtime's rule, PEFT's for a batch of one):
    out[b] = M_copy(s)(x[b])   when row b's assignment holds a slot s with a copy of M (at weight 1.0)
    out[b] = M(x[b])           otherwise (base rows, plain LoRA rows)
A batch runs M once over its base rows and each distinct copy once over its rows (index_select / index_copy),
so a batch with k distinct copies of M costs M's compute k + 1 times over disjoint row sets, never more.
Mixes: a weighted sum of whole modules is not defined (PEFT's add_weighted_adapter refuses two copies of one
module too), so a row may hold at most one slot with a copy of M, at weight 1.0; plain slots beside it (the
engine's merged adapter taken back out) leave the copy alone.
The pool keeps each slot's copies in its fast tier beside A and B: counted against the budget, evicted with them
and brought back by the pool's loader (`slots.reload`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn
from torch.func import functional_call

from ..errors import AdapterFileError, ShapeMismatchError, UnsupportedFeatureError
from ..store import AdapterFile

Copy = Mapping[str, torch.Tensor]  # one module's state dict, e.g. {"weight": (V, H)} for lm_head
# slot -> {module key: copy} of the modules that slot holds copies of ({} for none)
SavedSource = Callable[[int], Mapping[str, Copy]]


def saved_copies(af: AdapterFile, keys: Iterable[str], module: Callable[[str], Optional[nn.Module]]
                 ) -> dict[str, dict[str, torch.Tensor]]:
    """{module key: {param: tensor}} of the modules_to_save copies among the file keys `keys` (the keys that are
    not LoRA factors), e.g. "lm_head.weight" -> {"lm_head": {"weight": ...}}. `module(key)` returns the base's
    (unwrapped) module of that name, or None. A key belongs to the outermost module whose name ends with an
    entry of the config's modules_to_save (PEFT's rule); a copy must hold exactly that module's state dict with
    its shapes. Anything else is refused (UnsupportedFeatureError / ShapeMismatchError, naming the file), and so is
    a file saved with PEFT's ensure_weight_tying (copies tied across modules)."""
    what, targets = f"adapter {str(af.path)!r}", af.config.modules_to_save or []
    if af.raw_config.get("ensure_weight_tying") and (targets or keys):
        raise UnsupportedFeatureError(f"{what} was saved with ensure_weight_tying=true: PEFT ties its lm_head copy to "
                                      "an embed_tokens copy, which the runtime does not serve per row; train it with "
                                      "ensure_weight_tying=false (PEFT's default: an untied lm_head copy)")
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key in keys:
        parts = key.split(".")
        prefixes = [".".join(parts[:i]) for i in range(1, len(parts))]  # outermost first
        owner = next((m for m in prefixes if any(m.endswith(t) for t in targets) and module(m) is not None), None)
        if owner is None:
            raise UnsupportedFeatureError(f"{what} holds {key!r}, which is no LoRA factor, no lora_B bias and no "
                                          f"modules_to_save copy (modules_to_save={targets!r}) of this base: the "
                                          "runtime does not serve it (trained base biases, embedding LoRA, ...)")
        out.setdefault(owner, {})[key[len(owner) + 1:]] = af.tensors[key]
    for owner, params in out.items():
        want = module(owner).state_dict()
        if params.keys() != want.keys():
            raise AdapterFileError(f"{what}: its modules_to_save copy of {owner!r} holds {sorted(params)}, the base "
                                   f"module holds {sorted(want)}; a copy is the whole module")
        for p, t in params.items():
            if tuple(t.shape) != tuple(want[p].shape) or t.is_floating_point() != want[p].is_floating_point():
                raise ShapeMismatchError(f"{what}: {owner}.{p} is {tuple(t.shape)} {t.dtype}, the base's is "
                                         f"{tuple(want[p].shape)} {want[p].dtype} (adapter made for another base?)")
    return out


def copy_slot(get: SavedSource, assignment: Sequence[tuple[int, float]], key: str) -> Copy | None:
    """The copy of module `key` that a row with `assignment` runs, or None (the base module); refuses mixes."""
    found = [(s, w) for s, w in assignment if key in get(s)]
    if not found:
        return None
    if len(found) > 1 or found[0][1] != 1.0:
        raise UnsupportedFeatureError(
            f"a row mixes slot(s) {found} holding modules_to_save copies of {key!r}: a weighted mix of whole modules "
            "is not defined, so an adapter with modules_to_save copies is served alone in its row at weight 1.0")
    return get(found[0][0])[key]


@dataclass(slots=True)
class SavedLayer:
    """One module's rows: base_rows run the base module, each (rows, copy) of `copies` runs that copy."""

    num_rows: int
    base_rows: torch.Tensor | None  # (n0,) int64 rows on the base module; None = no row
    copies: tuple[tuple[torch.Tensor, Copy], ...]  # per distinct copy: its rows (n_u,) and its state dict
    row_copy: tuple[Copy | None, ...]  # per batch row: the copy it runs (None = the base module)

    def run(self, fn: Callable[[torch.Tensor, Copy | None], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """fn(x_rows, copy or None) over each row group of x (B, ...) -> the rows' outputs, in batch order."""
        if x.shape[0] != self.num_rows:
            raise ShapeMismatchError(f"a modules_to_save plan for {self.num_rows} rows got an input of "
                                     f"{x.shape[0]} rows {tuple(x.shape)}; build the plan for this batch's rows")
        groups = ([(self.base_rows, None)] if self.base_rows is not None else []) + list(self.copies)
        out = None
        for rows, copy in groups:
            y = fn(x.index_select(0, rows), copy)  # (n_u, ...)
            if out is None:
                out = y.new_empty((self.num_rows, *y.shape[1:]))
            out.index_copy_(0, rows, y)
        return out


def saved_layer(per_u: list[Copy | None], row_u: list[int], device: torch.device) -> SavedLayer | None:
    """One module's SavedLayer: per_u[u] is distinct assignment u's copy (or None), row_u[b] row b's u (-1: base)."""
    ids = {id(c): c for c in per_u if c is not None}  # one group per distinct copy (a slot's tensors)
    if not ids:
        return None
    row_copy = tuple(per_u[u] if u >= 0 else None for u in row_u)
    groups: dict[int | None, list[int]] = {}
    for b, c in enumerate(row_copy):
        groups.setdefault(None if c is None else id(c), []).append(b)
    idx = {k: torch.tensor(v, dtype=torch.long, device=device) for k, v in groups.items()}
    copies = tuple((idx[k], ids[k]) for k in groups if k is not None)
    return SavedLayer(len(row_u), idx.get(None), copies, row_copy)


class RuntimeModulesToSave(nn.Module):
    """The wrapper the runtime puts in place of a module some adapter holds a modules_to_save copy of: the
    current plan's rows run their adapter's copy (`torch.func.functional_call` of the base module with the
    copy's tensors), the other rows the base module. Holds no adapter tensors."""

    def __init__(self, original_module: nn.Module, key: str, current: Any) -> None:
        super().__init__()
        self.original_module = original_module
        self.key = key
        self._current = current  # the engine's CurrentPlan; a plain attribute, not a submodule

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        plan = self._current.plan
        lay = None if plan is None else plan.saved.get(self.key)
        if lay is None:
            return self.original_module(x, *args, **kwargs)
        if any(isinstance(a, torch.Tensor) for a in (*args, *kwargs.values())):
            raise UnsupportedFeatureError(
                f"module {self.key!r} is called with more tensor arguments than its input; the runtime splits only "
                "the first one by row, so a modules_to_save copy of it is not served per row")

        def fn(xs: torch.Tensor, copy: Copy | None) -> torch.Tensor:
            if copy is None:
                return self.original_module(xs, *args, **kwargs)
            return functional_call(self.original_module, dict(copy), (xs, *args), kwargs)

        return lay.run(fn, x)

    def extra_repr(self) -> str:
        return f"key={self.key!r}"
