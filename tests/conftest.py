"""Shared fixtures: tiny random models, each a fresh instance built with a fixed seed (eval mode).

    tiny_llama  LlamaForCausalLM, vocab 128, hidden 64, 2 layers      ids (B, T) -> logits (B, T, 128)
    tiny_gpt2   GPT2LMHeadModel (transformers Conv1D), same sizes     ids (B, T) -> logits (B, T, 128)
    tiny_mlp    Linear layers with/without bias: net.0, net.2, head   x (B, 16) -> (B, 8)
    tiny_conv   Embedding, Conv1d, Conv2d, Linear head                ids (B, T) in [0, 32) -> (B, T, 32)
    smollm2_dir the cached transformers directory of the embedded default (converted once; session-scoped)
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loraplex import models


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-model tests (restored after): faster for tiny matmuls, and on
    a shared 2-core machine far steadier (two OpenMP threads spin at barriers for a descheduled partner)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_model_fixture(name: str):
    """The fixture `name`: a fresh `models.<name>(seed=0)` per test."""

    def build() -> nn.Module:
        """A fresh tiny model, seed 0 (the module docstring lists them)."""
        return getattr(models, name)(seed=0)

    return pytest.fixture(name=name)(build)


tiny_llama, tiny_gpt2, tiny_mlp, tiny_conv = map(_tiny_model_fixture, ["tiny_llama", "tiny_gpt2", "tiny_mlp",
                                                                       "tiny_conv"])


@pytest.fixture(scope="session")
def smollm2_dir():
    return models.smollm2_path()
