"""The engine's running batch as per-lane LoRA stacks, updated one lane at a time.

A request keeps its KV lane (= its decode-batch row) from admission to finish, so the batch's LoRA can live in
stacks indexed by lane, per layer key:

    A[key]: (lanes, R, in)    lane b's virtual A (runtime/ops.py: a mix's slots concatenated along r),
    Bt[key]: (lanes, R, out)  its (w * scale * B).T, both zero past the lane's rank (zero padding is exact)

and one batch's LoRA at `key` is, for rows = some lanes,

    y[i] += (x[i] @ A[key][rows[i]].T) @ Bt[key][rows[i]]

the math of a gather `BatchPlan` (runtime/ops.py) whose rows are those lanes. Admitting a request writes its
lane (a copy of one adapter, ~10 MB for SmolLM2 at r = 8); a gather `BatchPlan` for the whole layout copies
every row again (~160 MB for 16 distinct adapters, as much time as a few decode steps on CPU), at every
admission. A lane's rows are written only when a batch first needs them (`rows`), from the one-row
`AdapterPool.plan` of its assignment (`BatchPlan.row_stacks`), so they hold the adapter versions the request
leased. Rows of lanes that no request holds are left as they are: their outputs are ignored. The stacks'
rank R grows with the largest rank written and shrinks (`shrink`) when the running lanes need at most half.

Only plain LoRA goes into stacks: an assignment whose plan has DoRA rows, LoRA-B biases, modules_to_save
copies or embedding rows makes `rows` return None, and the engine uses `AdapterPool.plan` for that batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..runtime import AdapterPool, Assignment
from ..runtime.strategies import GatherLayer


class LaneBatch:
    """The LoRA of a batch whose row i is lane rows[i]; has the part of `BatchPlan`'s interface that
    `CompactLlama` reads (`apply_`, `layers`, and no saved copies, embedding rows, biases or DoRA rows), and the
    dense per-row stacks its compiled step reads (`max_rank`, `row_stacks`, `rescale_stacks`)."""

    saved: dict = {}
    embeddings: dict = {}
    bias: dict = {}
    rescale: dict = {}

    def __init__(self, layers: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        # key -> the gather plan's layer over every row (A (n, R, in), Bt (n, R, out)), only the keys some lane
        # has LoRA at: the same math as a gather BatchPlan (runtime/strategies.py GatherLayer)
        self.layers = {k: GatherLayer(None, A, Bt) for k, (A, Bt) in layers.items()}

    def apply_(self, key: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y[i] += (x[i] @ A[i].T) @ Bt[i] in place for x (n, [L,] in), y (n, [L,] out); returns y."""
        layer = self.layers.get(key)
        if layer is not None and x.dim() == 2:  # (n, in): one token per row (unsqueezed: views of y)
            layer.apply_(x.unsqueeze(1), y.unsqueeze(1))
        elif layer is not None:
            layer.apply_(x, y)
        return y

    @property
    def max_rank(self) -> int:
        """R, the stacks' rank (0 when no lane has LoRA)."""
        return max((layer.A.shape[1] for layer in self.layers.values()), default=0)

    def row_stacks(self, key: str, rows: int, rank: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`BatchPlan.row_stacks`' contract (what the compiled decode step reads, runtime/compiled.py): the lane
        stacks themselves (views, no copy) when `rows` and `rank` are theirs, else zero-padded copies."""
        layer = self.layers.get(key)
        if layer is None:
            return None
        n, r = layer.A.shape[:2]
        if (rows, rank) == (n, r):
            return layer.A, layer.Bt
        A = layer.A.new_zeros(rows, rank, layer.A.shape[2])
        Bt = layer.Bt.new_zeros(rows, rank, layer.Bt.shape[2])
        A[:n, :r], Bt[:n, :r] = layer.A, layer.Bt
        return A, Bt

    def rescale_stacks(self, key: str, rows: int) -> None:
        """`BatchPlan.rescale_stacks`' contract: None, since lane stacks hold no DoRA rows."""
        return None


class LaneLora:
    """LoRA stacks for `lanes` KV lanes over the layers of `pool` (see the module docstring)."""

    def __init__(self, pool: AdapterPool, lanes: int) -> None:
        self.pool = pool
        self.lanes = lanes
        self.rank = 0  # R: the stacks' rank (grows with the largest rank written; see `shrink`)
        self.A: dict[str, torch.Tensor] = {}  # key -> (lanes, R, in)
        self.Bt: dict[str, torch.Tensor] = {}  # key -> (lanes, R, out)
        # what each lane's rows hold: (assignment, its slots' versions); None: nothing written yet
        self.held: list[tuple[Assignment, tuple[int, ...]] | None] = [None] * lanes
        self.ranks = [0] * lanes  # the virtual rank each lane's rows hold

    def rows(self, assignments: Sequence[Assignment], lanes: Sequence[int]) -> LaneBatch | None:
        """The batch whose row i is lane lanes[i] running assignments[i] (() = base only; the slots leased), after
        writing the lanes that do not hold it yet; None when one of them is not plain LoRA (module docstring)."""
        for a, lane in zip(assignments, lanes):
            held = (a, tuple(self.pool.version(s) for s, _ in a))  # a slot's version changes with its content
            if self.held[lane] != held:
                if not self._write(lane, a):
                    return None
                self.held[lane] = held
        if lanes and list(lanes) == list(range(lanes[0], lanes[0] + len(lanes))):  # contiguous: views, no copy
            sel = slice(lanes[0], lanes[0] + len(lanes))
            return LaneBatch({k: (A[sel], self.Bt[k][sel]) for k, A in self.A.items()})  # views
        idx = torch.tensor(list(lanes), dtype=torch.long, device=self.pool.device)
        return LaneBatch({k: (A.index_select(0, idx), self.Bt[k].index_select(0, idx)) for k, A in self.A.items()})

    def _write(self, lane: int, a: Assignment) -> bool:
        """Write assignment `a` into `lane`'s rows; False (nothing written) when it is not plain LoRA."""
        one = self.pool.plan([a]) if a else None  # cached by the pool while its slots keep their versions
        if one is not None and (one.rescale or one.bias or one.saved or one.embeddings):
            return False
        if one is not None and one.max_rank > self.rank:
            self._grow(one.max_rank)
        rows = {k: one.row_stacks(k, 1, self.rank) for k in one.in_out} if one is not None else {}
        for key, ab in rows.items():  # ab: A (1, R, in), Bt (1, R, out), or None where `a` has no LoRA
            if ab is not None and key not in self.A:
                self.A[key] = ab[0].new_zeros(self.lanes, *ab[0].shape[1:])
                self.Bt[key] = ab[1].new_zeros(self.lanes, *ab[1].shape[1:])
        for key, A in self.A.items():
            ab = rows.get(key)
            if ab is None:
                A[lane].zero_()
                self.Bt[key][lane].zero_()
            else:
                A[lane].copy_(ab[0][0])
                self.Bt[key][lane].copy_(ab[1][0])
        self.ranks[lane] = one.max_rank if one is not None else 0
        return True

    def shrink(self, keep: Sequence[int]) -> None:
        """When the lanes `keep` need at most half of R (and some LoRA): rebuild the stacks at their largest rank
        (a big-rank request that has left stops padding every later batch); other lanes are rewritten when used."""
        need = max((self.ranks[lane] for lane in keep), default=0)
        if need == 0 or 2 * need > self.rank:  # no LoRA running: keep the stacks for the next batch (no realloc)
            return
        for stacks in (self.A, self.Bt):
            for key in list(stacks):
                stacks[key] = stacks[key][:, :need].clone()
        self.held = [h if lane in keep else None for lane, h in enumerate(self.held)]
        self.rank = need

    def _grow(self, rank: int) -> None:
        """Pad every stack to `rank` (the written rows keep their values; the new rank rows are zero)."""
        for stacks in (self.A, self.Bt):
            for key, old in stacks.items():
                new = old.new_zeros(old.shape[0], rank, old.shape[2])
                new[:, : self.rank] = old
                stacks[key] = new
        self.rank = rank
