"""loraplex.quant: int8 / NF4 quantization, QuantLinear, quantize_model, save/load.

Every fast path is compared with tests/reference_quant.py (slow, element by element).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.pytorch_utils import Conv1D

import reference_quant as ref
from loraplex import models
from loraplex.errors import (
    LoraplexError,
    NonFiniteError,
    QuantConfigError,
    QuantFileError,
    ShapeMismatchError,
    TargetNotFoundError,
    UnsupportedModuleError,
)
from loraplex.functional import tolerance
from loraplex.quant import (
    NF4_CODEBOOK,
    QuantLinear,
    QuantSpec,
    load_quantized,
    module_nbytes,
    quantize_int8,
    quantize_model,
    quantize_nf4,
    save_quantized,
)
from loraplex.quant import linear as quant_linear
from loraplex.quant.nf4 import SCALE_BLOCK, ZERO_CODE

FAST = settings(max_examples=20, deadline=None)
MAX_GAP = max(b - a for a, b in zip(NF4_CODEBOOK, NF4_CODEBOOK[1:]))
SCHEMES = [("int8", False), ("nf4", False), ("nf4", True)]


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = tolerance(dtype)
    torch.testing.assert_close(got.double(), want.double(), atol=atol, rtol=rtol)


def assert_codes_match(got: list[int], want: list[int], normalized: list[float]) -> None:
    """Codes equal, except where a value sits (within float32 rounding) halfway between two codes."""
    for i, (g, w) in enumerate(zip(got, want)):
        if g != w:
            x = normalized[i]
            assert abs(abs(x - NF4_CODEBOOK[g]) - abs(x - NF4_CODEBOOK[w])) < 1e-6, (i, g, w, x)


def tiny_llama(seed: int = 0, **overrides: int) -> nn.Module:
    return models.tiny_llama(seed, **overrides)  # vocab 128, hidden 64, intermediate 128, 2 layers


def tiny_gpt2(seed: int = 0) -> nn.Module:
    return models.tiny_gpt2(seed, n_layer=1)  # Conv1D layers; lm_head tied to wte


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------------------ int8
def test_nf4_codebook_is_the_normal_float_construction():
    assert ref.NF4 == list(NF4_CODEBOOK)
    for got, want in zip(NF4_CODEBOOK, ref.nf4_construction()):
        assert abs(got - want) < 1e-6
    assert NF4_CODEBOOK[ZERO_CODE] == 0.0


@FAST
@given(out=st.integers(1, 12), inp=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_int8_matches_reference_and_error_bound(out, inp, seed):
    w = randn(out, inp, seed=seed) * (1 + seed % 5)
    q = quantize_int8(w)
    q_ref, s_ref = ref.quantize_int8(w)
    assert q.qweight.dtype == torch.int8 and q.scale.dtype == torch.float32
    assert torch.equal(q.qweight, q_ref) and torch.equal(q.scale, s_ref)
    deq = q.dequantize()
    assert torch.equal(deq, ref.dequantize_int8(q_ref, s_ref))
    err = (deq - w).abs()
    assert (err <= q.scale[:, None] / 2 * (1 + 1e-6) + 1e-12).all()
    assert q.nbytes() == out * inp + 4 * out


def test_int8_zero_rows_and_dtypes():
    w = randn(4, 8)
    w[1] = 0
    q = quantize_int8(w.to(torch.bfloat16))
    assert q.scale[1] == 0 and (q.qweight[1] == 0).all()
    assert (q.dequantize()[1] == 0).all()
    assert q.dequantize(torch.bfloat16).dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------- nf4
@FAST
@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=3), block_size=st.sampled_from([2, 4, 6, 16, 64]),
       seed=st.integers(0, 2**16))
def test_nf4_matches_reference_and_error_bound(shape, block_size, seed):
    w = randn(*shape, seed=seed)
    q = quantize_nf4(w, block_size)
    codes_ref, absmax_ref = ref.quantize_nf4(w, block_size)
    n = w.numel()
    nblocks = -(-n // block_size)
    assert q.packed.dtype == torch.uint8 and q.packed.numel() == nblocks * block_size // 2
    assert q.absmax.tolist() == absmax_ref
    codes = ref.unpack(q.packed)
    assert codes == q.codes().tolist()
    assert all(c == ZERO_CODE for c in codes[n:])  # padding encodes to 0.0
    flat = w.reshape(-1)
    normalized = [(flat[i] / q.absmax[i // block_size]).item() if q.absmax[i // block_size] else 0.0 for i in range(n)]
    assert_codes_match(codes[:n], codes_ref[:n], normalized)
    deq = q.dequantize()
    assert deq.shape == w.shape
    assert torch.equal(deq, ref.dequantize_nf4(codes, absmax_ref, block_size, tuple(shape)))
    per_elem = q.absmax.repeat_interleave(block_size)[:n].reshape(w.shape)
    assert ((deq - w).abs() <= per_elem * MAX_GAP / 2 * (1 + 1e-6)).all()


def test_nf4_packed_storage_is_half_a_byte_per_element():
    w = randn(64, 128)  # 8192 elements, 128 blocks of 64
    q = quantize_nf4(w)
    assert q.packed.numel() * q.packed.element_size() == 8192 // 2
    assert q.nbytes() == 8192 // 2 + 4 * 128
    assert torch.equal(q.packed, ref.pack(q.codes().tolist()))


def test_nf4_odd_sizes_pad_to_whole_blocks():
    w = randn(3, 5)  # 15 elements, block 4 -> 4 blocks, 16 codes, 8 bytes
    q = quantize_nf4(w, block_size=4)
    assert q.packed.numel() == 8 and q.absmax.numel() == 4
    assert q.codes()[15].item() == ZERO_CODE
    assert q.dequantize().shape == (3, 5)
    w1 = randn(1, 1)
    assert torch.allclose(quantize_nf4(w1).dequantize(), w1)  # a lone value is its own absmax: exact


def test_nf4_zero_blocks_dequantize_to_zero():
    for dq in (False, True):
        w = torch.zeros(2, 64)
        w[1] = randn(64)
        d = quantize_nf4(w, 64, dq).dequantize()
        assert (d[0] == 0).all()


def test_nf4_double_quant_matches_reference_saves_bytes_and_stays_close():
    w = randn(40, 1000)  # 40,000 elements -> 625 blocks -> 3 scale blocks of 256 (one partial)
    single = quantize_nf4(w, 64)
    double = quantize_nf4(w, 64, double_quant=True)
    assert double.double_quant and double.absmax is None
    assert torch.equal(double.packed, single.packed)  # the codes do not depend on how scales are stored
    codes_ref, scales_ref, mean_ref = ref.double_quantize(single.absmax.tolist(), SCALE_BLOCK)
    assert double.absmax_code.tolist() == codes_ref
    assert double.absmax_scale.tolist() == scales_ref and double.absmax_offset.item() == mean_ref
    absmax2 = double.block_absmax()
    assert absmax2.tolist() == ref.double_dequantize(codes_ref, scales_ref, mean_ref, SCALE_BLOCK)

    single_scale_bytes = single.nbytes() - single.packed.numel()
    double_scale_bytes = double.nbytes() - double.packed.numel()
    assert single_scale_bytes == 625 * 4
    assert double_scale_bytes == 625 + 3 * 4 + 4  # ~4x fewer
    # each block's absmax moves by at most half its scale step; the weights by that times |code| <= 1
    step = double.absmax_scale.repeat_interleave(SCALE_BLOCK)[:625]
    assert ((absmax2 - single.absmax).abs() <= step / 2 * (1 + 1e-5) + 1e-7).all()
    assert rel_err(double.dequantize(), single.dequantize()) < 0.01
    n_err = (double.dequantize() - w).abs().reshape(-1)
    bound = (single.absmax * MAX_GAP / 2 + step / 2).repeat_interleave(64) * (1 + 1e-5)
    assert (n_err <= bound).all()


def test_quantize_rejects_bad_input():
    with pytest.raises(NonFiniteError):
        quantize_nf4(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(NonFiniteError):
        quantize_int8(torch.tensor([[1.0, float("inf")]]))
    with pytest.raises(ShapeMismatchError):
        quantize_int8(torch.ones(3))
    with pytest.raises(ShapeMismatchError):
        quantize_nf4(torch.ones(3, 4, dtype=torch.int32))
    for bad in (0, 3, 65, -64, 64.0, True):
        with pytest.raises(QuantConfigError):
            quantize_nf4(torch.ones(4, 4), block_size=bad)
    with pytest.raises(QuantConfigError):
        QuantSpec("int4")
    with pytest.raises(QuantConfigError):
        QuantSpec("int8", double_quant=True)
    with pytest.raises(QuantConfigError):
        QuantSpec("nf4", compute_dtype=torch.int8)
    assert issubclass(QuantConfigError, ValueError) and issubclass(QuantConfigError, LoraplexError)


# ---------------------------------------------------------------------------------------- QuantLinear
@pytest.mark.parametrize("scheme,dq", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_linear_forward_matches_reference(scheme, dq, dtype):
    lin = nn.Linear(70, 9)  # 630 elements: not a multiple of 64
    x = randn(3, 5, 70, seed=2)
    layer = QuantLinear.from_linear(lin, scheme, double_quant=dq, compute_dtype=dtype)
    w = layer.dequantize()
    assert w.shape == (9, 70) and w.dtype == dtype
    # the stored weight against the reference dequantization
    if scheme == "int8":
        q_ref, s_ref = ref.quantize_int8(lin.weight.detach())
        w_ref = ref.dequantize_int8(q_ref, s_ref)
    else:
        q = layer.quantized_weight()
        w_ref = ref.dequantize_nf4(ref.unpack(q.packed), q.block_absmax().tolist(), 64, (9, 70))
    assert torch.equal(w.float(), w_ref.to(dtype).float())
    y = layer(x.to(dtype))
    assert y.shape == (3, 5, 9) and y.dtype == dtype
    assert_close(y, ref.linear(x.to(dtype), w_ref.to(dtype), lin.bias.detach().to(dtype)), dtype)
    # the slow path x @ dequantize().T + b agrees with the fast one
    assert_close(torch.nn.functional.linear(x.to(dtype), w, lin.bias.to(dtype)), y, dtype)
    assert layer(x).dtype == torch.float32  # output in the input's dtype


@FAST
@given(out=st.integers(1, 10), inp=st.integers(1, 50), batch=st.integers(1, 3), bias=st.booleans(),
       scheme=st.sampled_from(SCHEMES), block_size=st.sampled_from([2, 8, 64]), seed=st.integers(0, 2**16))
def test_quant_linear_property(out, inp, batch, bias, scheme, block_size, seed):
    torch.manual_seed(seed)
    lin = nn.Linear(inp, out, bias=bias)
    layer = QuantLinear.from_linear(lin, scheme[0], block_size=block_size, double_quant=scheme[1])
    x = randn(batch, inp, seed=seed + 1)
    assert_close(layer(x), ref.linear(x, layer.dequantize(), lin.bias), torch.float32)
    assert layer.nbytes() == module_nbytes(layer)


def test_quant_linear_is_frozen_buffers_in_state_dict_and_grad_flows_to_input():
    lin = nn.Linear(16, 8)
    before = lin.weight.detach().clone()
    layer = QuantLinear.from_linear(lin, "nf4", double_quant=True)
    assert torch.equal(lin.weight, before) and lin.weight.requires_grad  # caller's layer untouched
    assert set(layer.state_dict()) == {"packed", "absmax_code", "absmax_scale", "absmax_offset", "bias"}
    assert not any(p.requires_grad for p in layer.parameters())
    assert (layer.in_features, layer.out_features, layer.scheme) == (16, 8, "nf4")
    assert layer.original_weight is None
    x, g = randn(2, 16).requires_grad_(), randn(2, 8)
    (layer(x) * g).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    (F.linear(x_ref, layer.dequantize(), layer.bias) * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)  # the input gradient of the dequantized weight
    assert set(QuantLinear.from_linear(lin, "int8").state_dict()) == {"qweight", "scale", "bias"}


def test_backend_is_chosen_once_when_built():
    calls = []

    class Spy(quant_linear.TorchInt8Backend):
        name = "spy"

        def linear(self, x, weight, bias, dtype):
            calls.append(1)
            return super().linear(x, weight, bias, dtype)

    quant_linear.register_backend(Spy())
    try:
        layer = QuantLinear.from_linear(nn.Linear(4, 4), "int8")
        other = QuantLinear.from_linear(nn.Linear(4, 4), "nf4")
    finally:
        quant_linear._BACKENDS.pop(0)
    assert layer.backend.name == "spy" and other.backend.name == "torch-nf4"
    layer(torch.ones(1, 4))  # still the spy, though it is unregistered now
    assert calls == [1]


def test_requantize_replaces_weight_and_checks_shape():
    lin, lin2 = nn.Linear(12, 6), nn.Linear(12, 6)
    for scheme, dq in SCHEMES:
        layer = QuantLinear.from_linear(lin, scheme, block_size=8, double_quant=dq, keep_original=True)
        original = layer.original_weight.clone()
        layer.requantize(lin2.weight.detach())
        fresh = QuantLinear.from_linear(lin2, scheme, block_size=8, double_quant=dq)
        assert torch.equal(layer.dequantize(), fresh.dequantize())
        assert torch.equal(layer.bias, lin.bias)  # bias untouched
        assert torch.equal(layer.original_weight, original)  # still the pre-merge base
        with pytest.raises(ShapeMismatchError):
            layer.requantize(torch.ones(12, 6))


def test_keep_original_is_a_cpu_copy_outside_the_state_dict():
    lin = nn.Linear(8, 4)
    layer = QuantLinear.from_linear(lin, "nf4", keep_original=True)
    assert torch.equal(layer.original_weight, lin.weight) and layer.original_weight.device.type == "cpu"
    assert layer.original_weight.data_ptr() != lin.weight.data_ptr()
    assert not any(t is layer.original_weight for t in layer.state_dict().values())
    assert set(layer.state_dict()) == {"packed", "absmax", "bias"}


def test_conv1d_is_transposed_by_type():
    torch.manual_seed(0)
    conv = Conv1D(6, 10)  # nf=out=6, nx=in=10, weight (10, 6)
    lin = nn.Linear(10, 6)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.T)
        lin.bias.copy_(conv.bias)
    for scheme, dq in SCHEMES:
        a = QuantLinear.from_linear(conv, scheme, block_size=4, double_quant=dq)
        b = QuantLinear.from_linear(lin, scheme, block_size=4, double_quant=dq)
        assert (a.in_features, a.out_features) == (10, 6)
        assert torch.equal(a.dequantize(), b.dequantize())
        x = randn(3, 10)
        assert_close(a(x), ref.linear(x, a.dequantize(), conv.bias), torch.float32)
    with pytest.raises(UnsupportedModuleError):
        QuantLinear.from_linear(nn.Embedding(4, 4), "int8")


# ----------------------------------------------------------------------------------------- whole model
@pytest.mark.parametrize("scheme,dq,bound", [("int8", False, 0.03), ("nf4", False, 0.25), ("nf4", True, 0.25)])
def test_quantize_model_tiny_llama_logits_close(scheme, dq, bound):
    model = tiny_llama()
    with torch.no_grad():
        want = model(IDS).logits
    report = quantize_model(model, scheme, double_quant=dq)
    with torch.no_grad():
        got = model(IDS).logits
    err = rel_err(got, want)
    print(f"{scheme} dq={dq}: relative logit error {err:.4f}; {report}")
    assert err < bound  # measured: int8 ~0.007, nf4 ~0.10; a broken layout gives ~1
    assert len(report.modules) == 14 and "lm_head" not in report.modules
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, QuantLinear)
    assert report.bytes_after < report.bytes_before and report.bytes_after == module_nbytes(model)
    linear_elems = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantLinear))
    assert report.replaced_bytes_before == 4 * linear_elems  # Llama projections have no bias
    if scheme == "nf4" and not dq:
        assert report.replaced_bytes_after == linear_elems // 2 + 4 * (linear_elems // 64)


def test_quantize_model_gpt2_conv1d_and_skip_names():
    model = tiny_gpt2()
    with torch.no_grad():
        want = model(IDS).logits
    report = quantize_model(model, "int8", skip=("lm_head", "c_proj"))
    assert report.modules == ("transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc")
    assert isinstance(model.transformer.h[0].attn.c_proj, Conv1D)
    with torch.no_grad():
        assert rel_err(model(IDS).logits, want) < 0.03
    assert quantize_model(model, "int8").modules == ("transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj")
    with pytest.raises(QuantConfigError):
        quantize_model(model, "nf4", skip="lm_head")


def test_quantize_model_bytes_tiny_llama():
    sizes = {"fp32": module_nbytes(tiny_llama())}
    for label, scheme, dq in [("int8", "int8", False), ("nf4", "nf4", False), ("nf4+dq", "nf4", True)]:
        sizes[label] = quantize_model(tiny_llama(), scheme, double_quant=dq).bytes_after
    print("tiny llama bytes:", sizes)
    assert sizes["fp32"] > sizes["int8"] > sizes["nf4"] > sizes["nf4+dq"]


# ------------------------------------------------------------------------------------------- save/load
@pytest.mark.parametrize("scheme,dq", SCHEMES)
def test_save_load_round_trip_bit_exact(tmp_path, scheme, dq):
    model = tiny_llama()
    quantize_model(model, scheme, double_quant=dq)
    path = save_quantized(model, tmp_path / "q")
    config = json.loads((path / "quantization.json").read_text())
    assert config["scheme"] == scheme and len(config["modules"]) == 14
    loaded = load_quantized(tiny_llama(seed=1), path, scheme=scheme)
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) and want[k].dtype == got[k].dtype for k in want)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, loaded(IDS).logits)
    save_quantized(loaded, path)  # overwrite in place, atomically
    assert sorted(os.listdir(tmp_path)) == ["q"]


def test_save_load_gpt2_with_tied_head(tmp_path):
    model = tiny_gpt2()
    quantize_model(model, "nf4", block_size=32, double_quant=True)
    path = save_quantized(model, tmp_path / "g")
    assert json.loads((path / "quantization.json").read_text())["tied"] == {"lm_head.weight": "transformer.wte.weight"}
    loaded = load_quantized(tiny_gpt2(seed=3), path)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, loaded(IDS).logits)


def test_load_mismatches_raise_typed_errors_and_leave_model_untouched(tmp_path):
    model = tiny_llama()
    quantize_model(model, "nf4", block_size=64)
    path = save_quantized(model, tmp_path / "q")

    with pytest.raises(QuantConfigError, match="scheme"):
        load_quantized(tiny_llama(), path, scheme="int8")
    with pytest.raises(QuantConfigError, match="block_size"):
        load_quantized(tiny_llama(), path, block_size=32)
    with pytest.raises(QuantConfigError, match="double_quant"):
        load_quantized(tiny_llama(), path, double_quant=True)
    with pytest.raises(TargetNotFoundError, match="layers.1"):
        load_quantized(tiny_llama(num_hidden_layers=1), path)
    skeleton = tiny_llama(intermediate_size=96)
    with pytest.raises(ShapeMismatchError, match="mlp"):
        load_quantized(skeleton, path)
    assert not any(isinstance(m, QuantLinear) for m in skeleton.modules())  # rolled back
    with pytest.raises(QuantFileError):
        load_quantized(tiny_llama(), tmp_path / "missing")
    with pytest.raises(QuantConfigError):
        save_quantized(tiny_llama(), tmp_path / "plain")  # nothing quantized
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(QuantFileError, match="refusing"):
        save_quantized(model, tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep me"
    (path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(QuantFileError):
        load_quantized(tiny_llama(), path)
