"""PEFT-written adapters for the oracle tests of the runtime's per-row variants."""

from __future__ import annotations

import warnings
from pathlib import Path

import peft

from loraplex.models import tiny_llama
from lora_helpers import move_off_init


def peft_adapter_dir(directory: Path, tied: bool, seed: int, **fields) -> Path:
    """A PEFT adapter (LoraConfig(**fields)) on tiny_llama(seed=0) with or without tied embeddings, every trainable
    tensor (A, B, lora_B bias, copies, m, token rows) moved off its init by N(0, 0.1), saved to `directory`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about lora_bias on bias-less layers and about tied copies
        pm = peft.get_peft_model(tiny_llama(seed=0, tie_word_embeddings=tied),
                                 peft.LoraConfig(init_lora_weights=False, **fields))
    move_off_init(pm, seed)
    pm.save_pretrained(directory)
    return directory
