"""Fully sharded data parallel training with PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`).

`torchrun --nproc-per-node N -m loraplex train --fsdp ...` splits every float parameter of the model (the
frozen base and the adapters) into N shards, one per rank, instead of DDP's full copy on every rank:

    fully_shard(layer) for each decoder layer (the classes in the model's `_no_split_modules`)
    fully_shard(root)  the loss module: embeddings, final norm, output head and whatever else is left

A layer's parameters are all-gathered just before its forward (and again for its backward) and freed
after; gradients are reduce-scattered, so each rank keeps 1/N of the adapters' gradients and AdamW state.
Batches, the loss scaling and the empty-slice rule are those of distributed.py (FSDP averages gradients
over ranks as DDP does). Every forward is a collective, so every rank runs the same number of them (the
evaluation pads with zero-weight batches). The quantized weights of a QLoRA base are buffers, which FSDP2
replicates rather than shards; the float parameters around them are still sharded.

Mixed precision (`bf16=True`): parameters are all-gathered and computed in bf16, gradients reduced in fp32
into the fp32 shards, which the optimizer updates: bf16 compute over fp32 adapter master weights.

Saving and checkpoints gather what they write: `full_adapters` turns the adapter shards into full tensors
(every rank enters it; rank 0 writes), `optimizer_state` / `load_optimizer_state` convert AdamW's sharded
state to and from a full, parameter-name keyed state (torch.distributed.checkpoint.state_dict), so a
checkpoint is an ordinary file set written by rank 0.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn as nn

from ..errors import ConfigError
from .distributed import DistInfo


def shard(root: nn.Module, model: nn.Module, info: DistInfo, *, bf16: bool) -> nn.Module:
    """Apply fully_shard to each decoder layer of `model` and then to `root` (the module whose forward the
    loop calls, holding `model`); returns `root`, now an FSDPModule. Parameters move to `info.device`."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    block_names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in block_names]
    if not blocks:
        raise ConfigError(f"--fsdp: expected a transformers model that lists its decoder layer class in "
                          f"_no_split_modules, got {type(model).__name__} (no such layer found); train it with DDP "
                          "(torchrun without --fsdp)")
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
              else MixedPrecisionPolicy())
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(root, mesh=mesh, mp_policy=policy)
    return root


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def clip_grad_norm(params: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ that also takes sharded (DTensor) gradients: the total L2 norm over all
    shards (a collective then), and every gradient scaled by min(1, max_norm / (norm + 1e-6))."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, 2.0)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


@contextlib.contextmanager
def full_adapters(model: nn.Module) -> Iterator[None]:
    """Within: every trainable (adapter) parameter of `model` is a full, plain tensor on every rank, so the
    ordinary adapter writers read it; the shards are put back on exit. A collective: all ranks enter."""
    from torch.distributed.tensor import DTensor

    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for module in model.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                if p.requires_grad and isinstance(p, DTensor):
                    swapped.append((module, name, p))
                    module.register_parameter(name, nn.Parameter(p.full_tensor().detach(), requires_grad=False))
        yield
    finally:
        for module, name, p in swapped:
            module.register_parameter(name, p)


def optimizer_state(root: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's full state keyed by parameter name (every rank gets it; a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(root, optimizer, options=StateDictOptions(full_state_dict=True))


def load_optimizer_state(root: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a full state from `optimizer_state` into this rank's shards of the optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(root, optimizer, state, options=StateDictOptions(full_state_dict=True))
