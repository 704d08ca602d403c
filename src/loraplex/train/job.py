"""One adapter being trained ("job"): its tensors, its data (a Batcher), AdamW with warmup + cosine, progress.

The loop (loop.py Trainer) runs several jobs in one forward/backward; each job keeps its own optimizer,
schedule and data order, so it gets the updates it would get if trained alone.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch
import torch.nn as nn

from ..inject import lora_layers
from .data import Batcher, Example

if TYPE_CHECKING:
    from .config import TrainConfig


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup (s+1)/(warmup+1) for
    s < warmup, then cosine from 1 towards 0 that never reaches it (every step still learns)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(params: Sequence[nn.Parameter], config: TrainConfig, total_steps: int):
    """AdamW over `params` (the adapter's tensors only) and its LambdaLR warmup + cosine schedule.

    AdamW runs fused (one kernel for all tensors, as transformers' default `adamw_torch_fused`) where torch has
    that kernel: float tensors on CPU or CUDA. A step then costs ~10 ms instead of ~50 ms for SmolLM2's 420
    adapter tensors on CPU; the update is the same up to float rounding."""
    fused = all(p.dtype.is_floating_point and p.device.type in ("cpu", "cuda") for p in params) or None
    opt = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=config.weight_decay,
                            fused=fused)
    warmup = round(config.warmup_ratio * total_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total_steps, warmup))
    return opt, sched


def adapter_params(model: nn.Module, name: str) -> list[nn.Parameter]:
    """Adapter `name`'s A/B tensors in module order (the order optimizer states are saved in)."""
    return [t for _, layer in lora_layers(model) if name in layer.r for t in layer.adapter_params(name)]


class Job:
    """One adapter being trained: its tensors, data, optimizer, schedule and progress."""

    def __init__(self, name: str, params: Sequence[nn.Parameter], train: Sequence[Example],
                 held_out: Sequence[Example], config: TrainConfig, world_size: int, pad_id: int) -> None:
        self.name, self.params, self.config = name, list(params), config
        self.batcher = Batcher(train, config.batch_size * world_size, seed=config.seed, packing=config.packing,
                               max_length=config.max_length, pad_id=pad_id)
        self.total_micro = config.epochs * len(self.batcher)
        self.total_steps = config.max_steps or math.ceil(self.total_micro / config.grad_accum)
        self.optimizer, self.scheduler = make_optimizer(self.params, config, self.total_steps)
        self.steps_done = 0
        self._it: Optional[Any] = None
        self.train_examples, self.eval_examples = len(train), len(held_out)
        # eval: each distinct example once, weighted by how often it occurs (same mean, less work)
        counts: dict[tuple, list] = {}
        for e in held_out:
            counts.setdefault((tuple(e.input_ids), tuple(e.labels)), [e, 0])[1] += 1
        self.eval_unique = [e for e, _ in counts.values()]
        self.eval_weights = [float(n) for _, n in counts.values()]
        self.eval_before: Optional[float] = None
        self.eval_after: Optional[float] = None

    @property
    def done(self) -> bool:
        return self.steps_done >= self.total_steps

    def micro_in_step(self) -> int:
        if self.config.max_steps:
            return self.config.grad_accum
        return min(self.config.grad_accum, self.total_micro - self.steps_done * self.config.grad_accum)

    def next_micro(self) -> dict[str, torch.Tensor]:
        for _ in range(2):  # the iterator ends with the epoch; a new one starts the next epoch
            if self._it is None:
                self._it = iter(self.batcher)
            try:
                return next(self._it)
            except StopIteration:
                self._it = None
        raise RuntimeError("Batcher yielded an empty epoch")  # impossible: Batcher refuses empty data

    def state(self) -> dict[str, Any]:
        return {"steps_done": self.steps_done, "batcher": self.batcher.state_dict(),
                "eval_before": self.eval_before}

    def restore(self, state: dict[str, Any], optimizer: Optional[dict], scheduler: dict) -> None:
        """`optimizer` None: the caller loads the optimizer state (sharded: fsdp.load_optimizer_state)."""
        self.batcher.load_state_dict(state["batcher"])
        self._it = None
        self.steps_done, self.eval_before = state["steps_done"], state["eval_before"]
        if optimizer is not None:
            self.optimizer.load_state_dict(optimizer)
        self.scheduler.load_state_dict(scheduler)
