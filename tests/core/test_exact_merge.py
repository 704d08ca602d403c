"""functional.exact_merge / exact_restore and weight_layout, through every caller: merge-then-restore is
bit-exact in the LoRA layers (Linear and GPT-2 Conv1D, any float dtype), the runtime's merged mode and the
quantized layers; weight_layout agrees with PEFT's fan_in_fan_out detection."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.pytorch_utils import Conv1D

import loraplex as lp
from loraplex import functional as LF
from loraplex import models
from loraplex.errors import UnsupportedModuleError
from loraplex.layers import lora_layer_for
from loraplex.quant import QuantLinear
from loraplex.quant.lora import QuantizedMergeWarning
from loraplex.runtime import MultiLoraModel

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def base_layer(kind: str, fin: int, fout: int, dtype: torch.dtype, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    module = nn.Linear(fin, fout) if kind == "linear" else Conv1D(fout, fin)  # Conv1D(nf=out, nx=in)
    if kind == "conv1d":
        nn.init.normal_(module.weight, std=0.5)
    return module.to(dtype)


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(["linear", "conv1d"]), dtype=st.sampled_from(DTYPES), fin=st.integers(1, 24),
       fout=st.integers(1, 24), r=st.integers(1, 6), weight=st.floats(-3, 3), seed=st.integers(0, 2**16))
def test_layer_merge_then_unmerge_is_bit_exact(kind, dtype, fin, fout, r, weight, seed):
    layer = lora_layer_for(base_layer(kind, fin, fout, dtype, seed))
    layer.add_adapter("a", r, 2.0 * r, init=False, generator=torch.Generator().manual_seed(seed + 1))
    before = layer.base_layer.weight.detach().clone()
    record = layer.merge("a", weight, exact=True)
    layer.unmerge("a")
    after = layer.base_layer.weight.detach()
    assert after.dtype == before.dtype and torch.equal(after, before)
    assert (record.residual is None) == (record.restore_error == 0)


@settings(max_examples=60, deadline=None)
@given(dtype=st.sampled_from(DTYPES), shape=st.tuples(st.integers(1, 9), st.integers(1, 9)),
       seed=st.integers(0, 2**16), big=st.booleans())
def test_exact_merge_then_restore_is_bit_exact(dtype, shape, seed, big):
    """The pure functions on their own: any W, any delta (large ones round most elements)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g).to(dtype)
    d = torch.randn(shape, generator=g, dtype=torch.float64) * (1e3 if big else 1e-2)
    d = d.to(torch.promote_types(dtype, torch.float32))
    merged, restored, residual = LF.exact_merge(w, lambda t: t + d, lambda t: t - d)
    assert torch.equal(restored.view(-1)[residual[0]] != w.view(-1)[residual[0]], torch.ones_like(residual[0]) > 0)
    back = LF.exact_restore(merged, lambda t: t - d, residual)
    assert back.dtype == dtype and torch.equal(back, w)


def write_adapter(factory, directory: Path, seed: int, targets: list[str]) -> Path:
    model = factory()
    lp.inject(model, lp.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False), "x",
              seed=seed)
    with torch.no_grad():
        for _, layer in lp.lora_layers(model):
            layer.lora_B["x"].weight.mul_(7.0)  # a large delta: many elements round on the way back
    lp.save_adapter(model, "x", directory)
    return directory


@pytest.mark.parametrize("arch,targets", [("llama", ["q_proj", "down_proj"]), ("gpt2", ["c_attn", "c_fc"])])
@settings(max_examples=4, deadline=None)
@given(dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_runtime_merge_then_unmerge_is_bit_exact(arch, targets, dtype, seed):
    factory = models.tiny_llama if arch == "llama" else models.tiny_gpt2
    engine = MultiLoraModel(factory().to(dtype), target_modules=targets)
    with tempfile.TemporaryDirectory() as tmp:
        engine.load("x", write_adapter(factory, Path(tmp) / "x", seed, targets))
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    engine.merge("x")
    engine.unmerge()
    assert all(torch.equal(v, before[k]) for k, v in engine.model.state_dict().items())


@settings(max_examples=10, deadline=None)
@given(scheme=st.sampled_from(["int8", "nf4"]), strategy=st.sampled_from(["requantize", "from_original"]),
       weight=st.floats(-2, 2), seed=st.integers(0, 2**16))
def test_quant_merge_then_unmerge_is_bit_exact(scheme, strategy, weight, seed):
    torch.manual_seed(seed)
    layer = lora_layer_for(QuantLinear.from_linear(nn.Linear(64, 24), scheme, keep_original=True))
    layer.add_adapter("a", 4, 8.0, init=False, generator=torch.Generator().manual_seed(seed + 1))
    before = {k: v.clone() for k, v in layer.base_layer.quantized_weight().tensors().items()}
    layer.set_merge_strategy(strategy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", QuantizedMergeWarning)
        layer.merge("a", weight)
    layer.unmerge("a")
    after = layer.base_layer.quantized_weight().tensors()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_weight_layout_agrees_with_peft_fan_in_fan_out():
    """PEFT detects GPT-2's Conv1D (and sets fan_in_fan_out) by type; weight_layout says "in_out" exactly there."""
    peft = pytest.importorskip("peft")
    for factory, targets in [(models.tiny_gpt2, ["c_attn", "c_proj", "c_fc"]), (models.tiny_llama, "all-linear")]:
        model = factory()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT warns when it flips fan_in_fan_out for Conv1D
            wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=targets))
        layers = [m for m in wrapped.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
        assert layers
        for m in layers:
            assert (LF.weight_layout(m.base_layer) == "in_out") == m.fan_in_fan_out
            assert LF.linear_features(m.base_layer) == (m.in_features, m.out_features)


def test_weight_layout_refuses_other_modules():
    assert LF.weight_layout(QuantLinear.from_linear(nn.Linear(8, 4), "int8")) == "out_in"
    with pytest.raises(UnsupportedModuleError):
        LF.weight_layout(nn.Embedding(4, 3))
