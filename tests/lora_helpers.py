"""Helpers several test modules share for models with LoRA (or PEFT) adapters injected."""

from __future__ import annotations

import torch
import torch.nn as nn


def move_off_init(model: nn.Module, seed: int, std: float = 0.1) -> None:
    """Add N(0, std) noise (a CPU generator seeded with `seed`, parameters in model order) to every trainable
    tensor of `model` (A, B, DoRA's magnitude, LoRA-B biases, trainable token rows, modules_to_save copies), in
    place, as training would move them: B != 0, g != 1. PEFT models too: only requires_grad decides."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * std)
