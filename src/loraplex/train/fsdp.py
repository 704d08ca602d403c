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

Loading (`load_base_rank0` + `shard_from_rank0`): only rank 0 reads the base; every other rank builds the same
architecture on the meta device (no memory) from rank 0's config, fully_shard turns its meta parameters into
meta shards, `to_empty` gives them storage, and set_model_state_dict(..., broadcast_from_rank0=True) fills
every rank's shards from rank 0's full state dict (base and freshly initialized adapters alike, so the adapters
start as in the one-process run); buffers outside the state dict (rotary tables) are broadcast too. So a rank
other than 0 never holds more than its shards. run.py takes this path unless the base is quantized or the
adapter has a residual init (both compute from the full base weights on every rank; they load it there).

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
from ..models import load_base
from .distributed import DistInfo, broadcast_object


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


def load_base_rank0(spec: str, num_layers: int | None, info: DistInfo) -> tuple[nn.Module, object | None]:
    """models.load_base on rank 0; on every other rank the same model class built from rank 0's config on
    the meta device (no weights), with rank 0's tokenizer. An error loading the base is raised on every rank.
    A collective: all ranks enter."""
    loaded, error = None, None
    if info.is_main:
        try:
            loaded = load_base(spec, num_layers=num_layers)
        except Exception as exc:  # raised below on every rank (the others would wait in the broadcast forever)
            error = exc
    model, tokenizer = loaded if loaded is not None else (None, None)
    blueprint = broadcast_object((error, None if model is None else (type(model), model.config, tokenizer)), info)
    if blueprint[0] is not None:
        raise blueprint[0]
    if info.is_main:
        return model, tokenizer
    cls, config, tokenizer = blueprint[1]
    with torch.device("meta"):
        model = cls(config)
    return model.eval(), tokenizer


def shard_from_rank0(root: nn.Module, model: nn.Module, info: DistInfo, *, bf16: bool) -> nn.Module:
    """`shard`, for a `model` that is complete on rank 0 and on the meta device elsewhere (load_base_rank0,
    then the same inject/freeze on every rank): every rank's shards are filled from rank 0's tensors."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    full = root.state_dict() if info.is_main else {}  # rank 0: its full tensors, freed once distributed
    persistent = set(root.state_dict(keep_vars=True))
    extra = [name for name, _ in root.named_buffers() if name not in persistent]  # e.g. rotary inv_freq
    shard(root, model, info, bf16=bf16)
    if not info.is_main:
        root.to_empty(device=info.device)  # meta shards and buffers get (uninitialized) storage
    set_model_state_dict(root, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full
    for name in extra:
        dist.broadcast(root.get_buffer(name), src=0)
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
