"""The foundation on the real embedded base (2-layer truncated SmolLM2): PEFT reads our file, merge agrees."""

from __future__ import annotations

import peft
import pytest
import torch

import loraplex as lp
from loraplex.models import load_base

pytestmark = pytest.mark.smollm2


def test_smollm2_adapter_peft_interop_and_merge(tmp_path):
    model, tok = load_base("smollm2", num_layers=2)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    lp.inject(model, lp.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False), "a")
    with torch.no_grad():
        want = model(ids).logits
    lp.save_adapter(model, "a", tmp_path / "a", base_name="smollm2")
    fresh, _ = load_base("smollm2", num_layers=2)
    pm = peft.PeftModel.from_pretrained(fresh, tmp_path / "a").eval()
    with torch.no_grad():
        atol, rtol = lp.tolerance(torch.float32)  # a real 576-wide model: 10x, as test_core's merges
        torch.testing.assert_close(pm(ids).logits, want, atol=10 * atol, rtol=10 * rtol)
    lp.merge(model, "a")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, atol=10 * atol, rtol=10 * rtol)
