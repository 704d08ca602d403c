"""Multi-adapter runtime: many LoRA adapters on one base, a different adapter (or mix) per batch row.

`ops` holds the batched math (`BatchPlan`, `build_plan`, `lora_batched_`); `pool` holds the adapters of one
model in slots under a memory budget (`AdapterPool`, `Lease`).
"""

from .ops import (
    SEGMENT_MIN_ROWS_PER_ADAPTER,
    Assignment,
    AssignmentLike,
    BatchPlan,
    build_plan,
    choose_strategy,
    lora_batched_,
    normalize_assignment,
)
from .pool import AdapterPool, Lease, PoolStats

__all__ = [
    "SEGMENT_MIN_ROWS_PER_ADAPTER",
    "AdapterPool",
    "Assignment",
    "AssignmentLike",
    "BatchPlan",
    "Lease",
    "PoolStats",
    "build_plan",
    "choose_strategy",
    "lora_batched_",
    "normalize_assignment",
]
from .generate import Generation  # noqa: E402
from .batch import Batch  # noqa: E402
from .model import MultiLoraModel  # noqa: E402
from .store import AdapterStore  # noqa: E402
from .wrapper import RuntimeLinear  # noqa: E402

__all__ += ["AdapterStore", "Batch", "Generation", "MultiLoraModel", "RuntimeLinear"]
