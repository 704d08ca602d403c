"""The compact decoder's decode step compiled with torch.compile (inductor), with eager as the fallback.

One graph serves every batch size and span (dynamic shapes), so a server compiles it once, at start (`warm_up`):
  rows   the B rows as they are; B = 1 runs as 2 rows (a size-1 dimension would get a graph of its own): the pad
         row decodes token 0 at position 0 of lane 1, writes back the cache entries it reads there (its writes
         are no-ops), and its logits are dropped; with a 1-lane cache a 1-row step runs eagerly;
  span   attention reads positions 0..max(position) of each lane, masked past each row's position (no padding),
         always as two matmuls (eager decode switches to SDPA past a span, a branch a graph would split on);
  cache  reserved whole (max_lanes x max_len) at the first compiled step, so its tensors keep their shapes; the
         one step that would read all max_len positions (a contiguous slice: another graph) runs eagerly;
  LoRA   the batch plan as dense per-row stacks (`BatchPlan.row_stacks`, `rescale_stacks`): two bmm's per
         projection over all rows, zero for base-only and pad rows; built once per plan (the engine makes a new
         plan only when requests are admitted). A gather `BatchPlan`'s stacks are a second copy of the batch's
         adapters (SmolLM2, 16 rows at r=8: ~160 MB fp32); the serving engine's lane stacks (serve/lanes.py
         `LaneBatch`) are read as they are, without a copy.
One graph for base-only steps, plus one per structure of the plans met (which layers carry LoRA or DoRA), each
compiled the first time it is needed (SmolLM2 on 2 CPU cores: 1-2.5 minutes cold; the base graph ~35 s from
inductor's on-disk cache in later processes). The math is the eager step's (`CompactLlama.step`), so results
agree with eager decode to rounding (functional.tolerance).

`compile`: True, False, or "auto" (= True where torch.compile supports the platform). Any failure to compile
(no C compiler, an op inductor cannot lower, a dynamo error) logs one warning and the model decodes eagerly
from then on. The environment variable LORAPLEX_COMPILE=0 turns compiling off whatever the flag says.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .ops import BatchPlan

if TYPE_CHECKING:
    from .decoder import CompactLlama
    from .kvcache import KVCache

log = logging.getLogger(__name__)

RECOMPILE_LIMIT = 64  # graphs per compiled function before dynamo gives up: the base graph + one per plan structure


def resolve(compile: bool | str) -> bool:
    """Whether to compile the decode step for the flag `compile` (True, False or "auto")."""
    if compile not in (True, False, "auto"):
        raise ConfigError(f"compile must be True, False or 'auto', got {compile!r}")
    if os.environ.get("LORAPLEX_COMPILE") == "0":
        return False
    return torch._dynamo.is_dynamo_supported() if compile == "auto" else compile


class DenseLora:
    """A batch plan as dense per-row stacks; `apply_(key, x, y)` is BatchPlan.apply_'s math over every row:
    y[b] += (x[b] @ A[b].T) @ Bt[b], then y[b] = g[b] * y[b] + c[b] on layers with DoRA rows."""

    def __init__(self, plan: BatchPlan, rows: int) -> None:
        rank = plan.max_rank  # a dynamic dimension of the graph, like rows
        # what the decoder reads beside apply_: empty, since only plans that decoder.graph_ready accepts (no
        # copies, embedding rows or head LoRA) reach a graph
        self.saved: dict = {}
        self.embeddings: dict = {}
        self.layers: dict = {}
        self.stacks: dict[str, tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]] = {}
        for key in plan.layers:
            ab = plan.row_stacks(key, rows, rank)  # A (rows, R, in), Bt (rows, R, out)
            gc = plan.rescale_stacks(key, rows)  # (rows, 2, out)
            if ab is not None or gc is not None:
                self.stacks[key] = (*(ab or (None, None)), gc)

    def apply_(self, key: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (rows, L, in), y (rows, L, out) in place."""
        if key not in self.stacks:
            return y
        A, Bt, gc = self.stacks[key]
        if A is not None:
            y.add_(torch.bmm(torch.bmm(x.to(A.dtype), A.transpose(1, 2)), Bt))  # (rows, L, out)
        if gc is not None:
            y.mul_(gc[:, :1]).add_(gc[:, 1:])
        return y


class StaticDecode:
    """CompactLlama.decode through compiled graphs (see the module docstring); owned by the model."""

    def __init__(self, model: CompactLlama) -> None:
        self.model = model
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        self.fn = torch.compile(model.step, dynamic=True, fullgraph=True)
        self._dense: tuple[BatchPlan, int, DenseLora] | None = None  # the last plan's stacks, for `rows` rows

    def runs(self, batch: int, positions: torch.Tensor, cache: KVCache) -> bool:
        """Whether a step of `batch` rows at `positions` runs in the graph (else eagerly: see the module
        docstring)."""
        return (batch > 1 or cache.max_lanes > 1) and int(positions.max()) + 1 < cache.max_len

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
               plan: BatchPlan | None) -> torch.Tensor:
        """CompactLlama.decode's contract: tokens (B,), positions (B,) for lanes 0..B-1 -> logits (B, V); the
        caller checks `runs` first."""
        m, B, need = self.model, tokens.shape[0], int(positions.max()) + 1
        cache.reserve(B, need)  # refuses more lanes or positions than the cache holds, as eager decode
        cache.reserve(cache.max_lanes, cache.max_len)  # then the whole cache: its tensors keep their shapes
        rows = max(B, 2)
        tok = F.pad(tokens.to(m.device), (0, rows - B))  # (rows,) a pad row: token 0 at position 0
        pos = F.pad(positions.to(m.device), (0, rows - B))
        real = torch.arange(rows, device=m.device) < B  # (rows,)
        m._rope(pos[:1, None], need)  # grow the rotary tables outside the graph
        lora = self._lora(plan, rows) if plan is not None else None
        try:
            # without duck sizing, a batch size equal to another dimension's size at the first call (e.g. 3 rows
            # and 3 kv heads) is not assumed equal to it, which would make a graph for that size alone
            with torch.fx.experimental._config.patch(use_duck_shape=False):
                out = self.fn(tok, pos, cache.k, cache.v, need, lora, real)  # (rows, V)
        except torch._dynamo.exc.TorchDynamoException as exc:  # dynamo/inductor failed to compile this graph
            log.warning("loraplex: compiling the decode step failed, decoding eagerly from now on: %s",
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            m._static = None
            return m.decode(tokens, positions, cache, plan)
        return out[:B]

    def warm_up(self, cache: KVCache) -> None:
        """Compile the base-only graph now (a 2-row step in lanes 0 and 1 at position 1), then zero those lanes."""
        if cache.max_len < 3 or cache.max_lanes < 2:
            return  # a 2-row step at position 1 does not fit this cache: its steps run eagerly or in later graphs
        two = torch.zeros(2, dtype=torch.long)
        self.model.decode(two, two + 1, cache, None)
        for lane in (0, 1):
            cache.clear_lane(lane)

    def _lora(self, plan: BatchPlan, rows: int) -> DenseLora:
        if self._dense is None or self._dense[0] is not plan or self._dense[1] != rows:
            self._dense = (plan, rows, DenseLora(plan, rows))
        return self._dense[2]
