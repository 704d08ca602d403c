"""Data-parallel training helpers: process group set-up under torchrun, sharding, DDP, collectives.

Launched by `torchrun --nproc-per-node N -m loraplex train ...`, every process builds the same global
micro-batches (the Batcher runs with batch_size * world_size rows) and keeps its contiguous slice:

    global micro-batch rows [0 .. B*W)   rank r trains rows [r*B, (r+1)*B)

The loss is normalized by the loss-token count of the GLOBAL step (known to every rank without a
collective, since every rank sees the whole global batch), multiplied by W to undo DDP's averaging; so
the summed gradient equals the one-process gradient of the same global batch, up to float summation order.
A rank whose slice is empty (the last, short batch of an epoch) trains one copy of row 0 with every label
masked: it contributes exactly zero but still runs forward/backward, which DDP's collectives need.
Only rank 0 writes files. Without torchrun (WORLD_SIZE unset or 1) everything here is a no-op.
"""

from __future__ import annotations

import datetime
import inspect
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from ..device import parse_device, resolve_device
from ..errors import ConfigError, DeviceError
from .data import IGNORE_INDEX


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # True when init_distributed created the process group (and must destroy it)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and join the process group: NCCL on CUDA,
    gloo on CPU. `device`: a --device value (loraplex.device); under torchrun "auto" and "cuda" mean
    cuda:LOCAL_RANK (one GPU per process), and a fixed cuda:N or mps is refused (no per-rank choice)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if world > 1 and dev.type == "cuda":
        if parse_device(device) not in ("auto", "cuda"):
            raise DeviceError(f"--device {device} under torchrun: expected auto or cuda (each process takes "
                              "cuda:LOCAL_RANK); set CUDA_VISIBLE_DEVICES to choose the GPUs")
        dev = resolve_device(f"cuda:{local}")
    if world > 1 and dev.type not in ("cpu", "cuda"):
        raise DeviceError(f"--device {device} under torchrun: expected cpu or cuda (torch.distributed has no "
                          f"backend for {dev.type}); train on one process there")
    use_cuda = dev.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(dev)
    if world <= 1:
        return DistInfo(device=dev)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30))
        owns = True
    if dist.get_world_size() != world:
        raise ConfigError(f"WORLD_SIZE={world} but the process group has {dist.get_world_size()} processes")
    return DistInfo(rank=dist.get_rank(), world_size=world, local_rank=local, device=dev, owns_group=owns)


def shutdown(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def shard(batch: dict[str, torch.Tensor], info: DistInfo, rows_per_rank: int) -> dict[str, torch.Tensor]:
    """This rank's contiguous slice of a global batch (see the module doc), trailing all-pad columns trimmed.
    An empty slice becomes one fully masked copy of row 0 (zero loss, but forward/backward still run)."""
    start = info.rank * rows_per_rank
    n = batch["input_ids"].shape[0]
    if start >= n:
        out = {k: v[:1].clone() for k, v in batch.items()}
        out["labels"].fill_(IGNORE_INDEX)
        return out
    out = {k: v[start:start + rows_per_rank] for k, v in batch.items()}
    if "attention_mask" in out:  # padded batch: drop columns that are padding in every kept row
        width = int(out["attention_mask"].sum(1).max())
        out = {k: v[:, :width] for k, v in out.items()}
    return out


def wrap(module: nn.Module, info: DistInfo, *, find_unused_parameters: bool) -> nn.Module:
    """DDP around `module` when distributed (else `module` itself). Only parameters with requires_grad are
    reduced, i.e. the LoRA tensors; the frozen base is broadcast from rank 0 once, at construction."""
    if not info.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [info.device.index] if info.device.type == "cuda" else None
    # buffers (rotary tables, quantized weights) are the same on every rank: no per-forward broadcast (the flag
    # is forward_sync_buffers since torch 2.13, which deprecates broadcast_buffers; older torch has only that)
    new = "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
    no_sync = {"forward_sync_buffers" if new else "broadcast_buffers": False}
    return DDP(module, device_ids=ids, find_unused_parameters=find_unused_parameters, **no_sync)


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum of `t` over ranks (in place), a no-op on one process."""
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's `obj` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
