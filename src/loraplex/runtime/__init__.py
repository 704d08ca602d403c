"""Multi-adapter runtime: many LoRA adapters on one base, a different adapter (or mix) per batch row.

    ops       the batched math (`BatchPlan`, `build_plan`, `lora_batched_`); strategies: its gather and segment
              layers; rows: which rows read which distinct assignment
    pool      the adapters of one model in slots under a memory budget (`AdapterPool`; pooltypes: `Lease`,
              `PoolStats`); tier: the fast tier (budget, eviction, reload); slots: what a slot holds and the
              checks on add / reload (`pool_tensors`: an adapter file as pool input); plancache: the pool's
              cache of plans
    store     `AdapterStore`: a folder of adapter directories (the one listing rule; the server's builds on it)
    model     `MultiLoraModel`: the Hugging Face model path (wrapper: `RuntimeLinear`; wrapping: the wrapped
              modules; merged: merged mode; batch: `Batch`)
    decoder   `CompactLlama`, the Llama-family decoder the server runs (kernels: its projection kernel;
              kvcache: `KVCache`, its cache lanes)
    rescale   DoRA's per-slot terms; rowbias: LoRA-B biases per row; saved_modules: modules_to_save copies per row
    embedding embedding LoRA and trainable tokens per row (`RuntimeEmbedding`, `EmbeddingLayer`)
    generate  batched generation, the stop rule and left pad (`generate`, `stop_ids`, `left_pad`)
    sampling  the one sampler (`SamplingParams`, `sample_next`)
    logprobs  raw token logprobs (`TokenLogprob`, `token_logprobs`)
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
