"""Row bookkeeping of a batch plan: which rows of the batch read which distinct assignment.

A plan numbers the distinct non-empty assignments of its batch u = 0..U-1 (first-seen order); row_u[b] is row
b's u (-1: base only) and rows_of[u] the rows of u, ascending. Per-row terms (DoRA's [g; c], LoRA-B biases) are
stored once per distinct assignment and indexed per row (`stack_rows`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import ShapeMismatchError


class RowIndex:
    """Row bookkeeping shared by every layer of a plan (built once per plan)."""

    def __init__(self, rows_of: list[list[int]], row_u: list[int], device: torch.device) -> None:
        self.rows_of, self.row_u, self.device = rows_of, row_u, device
        self.sel = [  # per distinct assignment: its rows as a slice when contiguous, else an index tensor
            slice(r[0], r[-1] + 1) if r[-1] - r[0] + 1 == len(r) else torch.tensor(r, dtype=torch.long, device=device)
            for r in rows_of
        ]
        self._active: dict[tuple[int, ...], tuple[torch.Tensor | None, list[int]]] = {}

    def active(self, present: tuple[int, ...]) -> tuple[torch.Tensor | None, list[int]]:
        """Rows whose assignment is in `present` (ascending; None = all rows) and each one's assignment."""
        if present not in self._active:
            keep = set(present)
            act = [b for b, u in enumerate(self.row_u) if u in keep]
            idx = None if len(act) == len(self.row_u) else torch.tensor(act, dtype=torch.long, device=self.device)
            self._active[present] = (idx, [self.row_u[b] for b in act])
        return self._active[present]


def stack_rows(per_u: list[torch.Tensor | None], row_u: list[int], shape: Sequence[int], what: str,
               device: torch.device, dtype: torch.dtype
               ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None] | None:
    """One layer's per-row tensors, stored once per distinct assignment: per_u[u] is assignment u's tensor of
    `shape` (or None), row_u[b] row b's u. Returns (rows, stack, u): rows (n,) int64 the rows that have one
    (None = every row), stack (U', *shape) the tensors present in `dtype` on `device`, u (n,) int64 row -> index
    into stack (None when U' == 1); None when no assignment has one. `what` names the tensor in shape errors."""
    present = [u for u, t in enumerate(per_u) if t is not None]
    if not present:
        return None
    for u in present:
        if tuple(per_u[u].shape) != tuple(shape):
            raise ShapeMismatchError(f"{what} must be {tuple(shape)}, got {tuple(per_u[u].shape)}")
    where = {u: i for i, u in enumerate(present)}
    rows = [b for b, u in enumerate(row_u) if u in where]
    stack = torch.stack([per_u[u].to(device=device, dtype=dtype) for u in present])  # (U', *shape)
    idx = None if len(rows) == len(row_u) else torch.tensor(rows, dtype=torch.long, device=device)
    u = None if len(present) == 1 else torch.tensor([where[row_u[b]] for b in rows], dtype=torch.long, device=device)
    return idx, stack, u
