"""The data- and quantization-driven inits `train` performs itself (TrainConfig.init in DATA_INITS):
"eva" (train/eva.py) from each adapter's own training batches, "loftq" (quant/loftq.py) over --quantize's scheme.

With "loftq" the quantized base differs from plain --quantize, so train writes it to OUT/loftq-base
(quant/io.py's save_quantized); the adapter is a plain LoRA relative to that base:
    model = load_base(BASE); load_quantized(model, OUT/loftq-base); load_adapter(model, OUT)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..config import LoraConfig
from ..quant.loftq import LoftQConfig, loftq_quantize
from .data import IGNORE_INDEX, Batcher, Example
from .eva import Batch, EvaConfig
from .config import TrainConfig

LOFTQ_BASE = "loftq-base"  # OUT/loftq-base: the LoftQ-quantized base the adapter belongs to
_BITS = {"nf4": 4, "int8": 8}


def eva_config(config: TrainConfig) -> EvaConfig:  # (eva_max_batches goes to inject_eva itself)
    """The EvaConfig of a run's --eva-* flags (the label mask value is the data's IGNORE_INDEX)."""
    return EvaConfig(rho=config.eva_rho, tau=config.eva_tau, use_label_mask=config.eva_label_mask,
                     label_mask_value=IGNORE_INDEX, whiten=config.eva_whiten,
                     adjust_scaling_factors=config.eva_adjust_scaling)


def eva_batches(examples: list[Example], config: TrainConfig, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """One epoch of an adapter's training batches (batch_size rows each, its seed's order, packed with --packing),
    the data EVA cycles over. Every process uses the same ones, so EVA's result equals a one-process run."""
    return list(Batcher(examples, config.batch_size, seed=config.seed, packing=config.packing,
                        max_length=config.max_length, pad_id=pad_id))


def forward_no_cache(model: nn.Module, batch: Batch) -> Any:
    """model(**batch, use_cache=False): packed rows (position_ids, no attention_mask) stay per-example."""
    return model(**batch, use_cache=False)


def loftq_base(model: nn.Module, lora: LoraConfig, config: TrainConfig) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Quantize the modules `lora` targets with LoftQ (bits from --quantize, --loftq-iter alternations, nf4's
    block size and double quant); returns the adapter start {module: (A, B)}."""
    loftq = LoftQConfig(loftq_bits=_BITS[config.quantize], loftq_iter=config.loftq_iter)
    return loftq_quantize(model, lora, loftq, block_size=config.quant_block_size, double_quant=config.double_quant)
