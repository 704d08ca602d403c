"""The compact decoder's decode step compiled with torch.compile (inductor), with eager as the fallback.

A compiled graph has static shapes, so a step is padded until a handful of graphs cover every step:
  rows   the batch B is padded to the smallest ROW_BUCKETS entry >= B (capped at the cache's max_lanes); a pad
         row decodes token 0 at position 0 of its lane b >= B, writes back the cache entries it reads there (its
         writes are no-ops), and its logits are dropped;
  span   attention reads positions 0..S-1 of each lane, masked past each row's position; S is the smallest power
         of two >= max(position) + 1 and >= MIN_SPAN, capped at the cache's max_len;
  cache  reserved whole (max_lanes x max_len) at the first compiled step, so its tensors never change shape;
  LoRA   the batch plan as dense per-row stacks (`BatchPlan.row_stacks`, `rescale_stacks`): two bmm's per
         projection over all rows, zero for base-only and pad rows, rank padded to a power of two; built once
         per plan (the engine makes a new plan only when requests are admitted); they hold a second copy of
         the batch's adapters (SmolLM2, 16 rows at r=8: ~160 MB fp32).
One graph per (rows, span, rank, layers with LoRA / DoRA), compiled the first time it is met (tens of seconds
for SmolLM2 on 2 CPU cores). The math is the eager step's (`CompactLlama.step`), so results agree with eager
decode to rounding (functional.tolerance).

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

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # padded batch sizes; larger batches round up to a multiple of 64
MIN_SPAN = 64  # the shortest attention span a graph is made for
RECOMPILE_LIMIT = 64  # graphs per compiled function before dynamo gives up (its default, 8, is too few here)


def resolve(compile: bool | str) -> bool:
    """Whether to compile the decode step for the flag `compile` (True, False or "auto")."""
    if compile not in (True, False, "auto"):
        raise ConfigError(f"compile must be True, False or 'auto', got {compile!r}")
    if os.environ.get("LORAPLEX_COMPILE") == "0":
        return False
    return torch._dynamo.is_dynamo_supported() if compile == "auto" else compile


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def row_bucket(n: int, max_lanes: int) -> int:
    """The padded batch size for n rows (n <= max_lanes)."""
    b = next((b for b in ROW_BUCKETS if b >= n), -(-n // 64) * 64)
    return min(b, max_lanes)


class DenseLora:
    """A batch plan as dense per-row stacks; `apply_(key, x, y)` is BatchPlan.apply_'s math over every row:
    y[b] += (x[b] @ A[b].T) @ Bt[b], then y[b] = g[b] * y[b] + c[b] on layers with DoRA rows."""

    def __init__(self, plan: BatchPlan, rows: int) -> None:
        rank = _pow2(plan.max_rank)
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
        self.fn = torch.compile(model.step, dynamic=False, fullgraph=True)
        self._dense: tuple[BatchPlan, int, DenseLora] | None = None  # the last plan's stacks, for `rows` rows

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
               plan: BatchPlan | None) -> torch.Tensor:
        """CompactLlama.decode's contract: tokens (B,), positions (B,) for lanes 0..B-1 -> logits (B, V)."""
        m, B, need = self.model, tokens.shape[0], int(positions.max()) + 1
        cache.reserve(B, need)  # refuses more lanes or positions than the cache holds, as eager decode
        cache.reserve(cache.max_lanes, cache.max_len)  # then the whole cache: its tensors keep their shapes
        rows = row_bucket(B, cache.max_lanes)
        span = min(max(_pow2(need), MIN_SPAN), cache.max_len)
        tok = F.pad(tokens.to(m.device), (0, rows - B))  # (rows,) pad rows: token 0 at position 0
        pos = F.pad(positions.to(m.device), (0, rows - B))
        real = torch.arange(rows, device=m.device) < B  # (rows,)
        m._rope(pos[:1, None], span)  # grow the rotary tables outside the graph
        lora = self._lora(plan, rows) if plan is not None else None
        try:
            out = self.fn(tok, pos, cache.k, cache.v, span, lora, real)  # (rows, V)
        except torch._dynamo.exc.TorchDynamoException as exc:  # dynamo/inductor failed to compile this graph
            log.warning("loraplex: compiling the decode step failed, decoding eagerly from now on: %s",
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            m._static = None
            return m.decode(tokens, positions, cache, plan)
        return out[:B]

    def _lora(self, plan: BatchPlan, rows: int) -> DenseLora:
        if self._dense is None or self._dense[0] is not plan or self._dense[1] != rows:
            self._dense = (plan, rows, DenseLora(plan, rows))
        return self._dense[2]
