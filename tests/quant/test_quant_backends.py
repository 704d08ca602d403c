"""Library backends (quant/backends.py) against the pure-PyTorch reference (backend "loraplex").

Each backend quantizes into loraplex's stored layout and computes x @ deQ(W).T + b, so: its stored weight is
within the scheme's error bound of the float weight (bit-identical for bitsandbytes NF4), its forward equals the
reference forward over the same stored tensors, LoRA trains over it, and merge/unmerge behave as the reference.
A missing package skips its tests (named in the reason); CUDA cases are marked gpu.
"""

from __future__ import annotations

import importlib.util
import sys
import warnings

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import loraplex as lp
from loraplex import models
from loraplex.cli import main
from loraplex.errors import MergeStateError, MissingDependencyError, QuantConfigError
from loraplex.functional import tolerance
from loraplex.layers import lora_layer_for
from loraplex.quant import (
    QuantLinear, QuantSpec, load_quantized, quantize_model, quantize_nf4, save_quantized, select_backend,
)
from loraplex.quant.int8 import quantize_int8
from loraplex.quant.lora import merge_quantized

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def _needs(package: str):
    return pytest.mark.skipif(importlib.util.find_spec(package) is None,
                              reason=f"{package} is not installed (pip install 'loraplex[{package}]')")


BNB = _needs("bitsandbytes")
TORCHAO = _needs("torchao")
# (backend, scheme, double_quant): every combination a library backend runs
CASES = [pytest.param("bitsandbytes", "nf4", False, marks=BNB), pytest.param("bitsandbytes", "nf4", True, marks=BNB),
         pytest.param("torchao", "int8", False, marks=TORCHAO)]
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype = torch.float32) -> None:
    atol, rtol = tolerance(dtype)
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


def stored(layer: QuantLinear) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in layer.quantized_weight().tensors().items()}


# -- quantization against the reference ---------------------------------------------------------------------
@BNB
@settings(max_examples=25, deadline=None)
@given(out=st.integers(1, 40), inp=st.integers(1, 70), block=st.sampled_from([64, 128, 256]),
       dq=st.booleans(), seed=st.integers(0, 2**16), scale=st.sampled_from([1e-3, 1.0, 50.0]))
def test_bitsandbytes_nf4_is_bit_identical_to_the_reference(out, inp, block, dq, seed, scale):
    """Same code book, packing and fp32 absmax: the stored tensors are equal, padding included."""
    w = torch.randn(out, inp, generator=torch.Generator().manual_seed(seed)) * scale
    spec = QuantSpec("nf4", block, dq)
    got = select_backend(spec, torch.device("cpu"), "bitsandbytes").quantize(w, spec).tensors()
    want = quantize_nf4(w, block, dq).tensors()
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


@TORCHAO
@settings(max_examples=25, deadline=None)
@given(out=st.integers(1, 40), inp=st.integers(1, 70), seed=st.integers(0, 2**16),
       scale=st.sampled_from([1e-3, 1.0, 50.0]))
def test_torchao_int8_is_within_the_scheme_bound_of_the_reference(out, inp, seed, scale):
    """Per-row absmax int8 as the reference, with torchao's scale absmax / 127.5: |W - q s| <= s / 2, and the
    two dequantized weights differ by at most the sum of the two half-steps."""
    w = torch.randn(out, inp, generator=torch.Generator().manual_seed(seed)) * scale
    spec = QuantSpec("int8")
    got = select_backend(spec, torch.device("cpu"), "torchao").quantize(w, spec)
    want = quantize_int8(w)
    assert got.qweight.dtype == torch.int8 and got.scale.shape == (out,)
    eps = 1e-6 * w.abs().amax(dim=1, keepdim=True)  # fp32 rounding of the scale products
    assert ((w - got.dequantize()).abs() <= got.scale[:, None] / 2 + eps).all()
    bound = (got.scale + want.scale)[:, None] / 2 + eps
    assert ((got.dequantize() - want.dequantize()).abs() <= bound).all()


@BNB
@settings(max_examples=25, deadline=None)
@given(out=st.integers(1, 40), blocks=st.integers(1, 3), extra=st.sampled_from([0, 0, 2, 34]),
       block=st.sampled_from([64, 128]), dq=st.booleans(), seed=st.integers(0, 2**16))
def test_bitsandbytes_cpu_forward_equals_the_reference_or_refuses(out, blocks, extra, block, dq, seed):
    """bitsandbytes' CPU kernel is right when rows hold whole blocks; any other weight is refused on CPU."""
    torch.manual_seed(seed)
    linear = nn.Linear(blocks * block + extra, out)
    if extra:
        with pytest.raises(QuantConfigError, match="multiple of block_size"):
            QuantLinear.from_linear(linear, "nf4", block_size=block, double_quant=dq, backend="bitsandbytes")
        return
    layer = QuantLinear.from_linear(linear, "nf4", block_size=block, double_quant=dq, backend="bitsandbytes")
    x = torch.randn(4, linear.in_features)
    with torch.no_grad():  # bitsandbytes takes another kernel without autograd
        assert_close(layer(x), x @ layer.dequantize().T + linear.bias)
    assert_close(layer(x.requires_grad_(True)), x @ layer.dequantize().T + linear.bias)


# -- the layer: forward, LoRA, save / load ----------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend,scheme,dq", CASES)
def test_forward_equals_the_reference_over_the_same_stored_weight(backend, scheme, dq, device):
    torch.manual_seed(0)
    linear = nn.Linear(128, 40).to(device)
    layer = QuantLinear.from_linear(linear, scheme, double_quant=dq, backend=backend)
    assert layer.backend.name.startswith(backend)
    reference = QuantLinear.like(linear, layer.spec)  # backend "loraplex"
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(3, 5, 128, device=device)
    y = layer(x)  # (3, 5, 40)
    assert_close(y, reference(x))
    assert_close(y, x @ layer.dequantize().T + linear.bias)
    if device == "cuda":  # the CPU run of the same stored tensors is the reference
        cpu = QuantLinear.like(linear.cpu(), layer.spec, backend)
        cpu.load_state_dict({k: v.cpu() for k, v in layer.state_dict().items()})
        assert_close(y.cpu(), cpu(x.cpu()))


@pytest.mark.parametrize("backend,scheme,dq", CASES)
def test_lora_forward_and_backward_over_the_backend_match_the_reference(backend, scheme, dq):
    """Same stored weight, same adapter: outputs and the gradients of A, B and x agree with backend loraplex."""
    torch.manual_seed(0)
    linear = nn.Linear(128, 40)
    source = QuantLinear.from_linear(linear, scheme, double_quant=dq, backend=backend)  # the backend's codes
    layers = []
    for name in (backend, "loraplex"):
        q = QuantLinear.like(linear, source.spec, name)
        q.load_state_dict(source.state_dict())
        layer = lora_layer_for(q)
        layer.add_adapter("a", 4, 8.0, init=False, generator=torch.Generator().manual_seed(1))
        layer.active = [("a", 1.0)]
        layers.append(layer)
    x = torch.randn(6, 128, generator=torch.Generator().manual_seed(2))
    grads = []
    for layer in layers:
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        (y.square().sum()).backward()
        params = dict(layer.named_parameters())
        grads.append((y.detach(), xi.grad, *(p.grad for n, p in sorted(params.items()) if p.requires_grad)))
        assert all(p.grad is None for p in params.values() if not p.requires_grad)  # the base stays frozen
    assert len(grads[0]) == 4  # y, x.grad, lora_A.grad, lora_B.grad
    for got, want in zip(*grads):
        assert_close(got, want)


@pytest.mark.parametrize("backend,scheme,dq", CASES)
def test_model_saves_and_loads_back_onto_any_backend(backend, scheme, dq, tmp_path):
    model = models.tiny_llama(seed=0)
    quantize_model(model, scheme, double_quant=dq, backend=backend)
    want = model(IDS).logits
    save_quantized(model, tmp_path / "q")
    for name in (backend, "loraplex"):
        loaded = load_quantized(models.tiny_llama(seed=1), tmp_path / "q", backend=name)
        assert loaded.get_submodule("model.layers.0.mlp.up_proj").backend.name.startswith(
            "torch" if name == "loraplex" else name)
        assert_close(loaded(IDS).logits, want)


# -- merge: as the reference does it -------------------------------------------------------------------------
@pytest.mark.parametrize("backend,scheme,dq", CASES)
def test_merge_requantizes_with_the_backend_and_unmerge_is_exact(backend, scheme, dq):
    model = models.tiny_llama(seed=0)
    quantize_model(model, scheme, double_quant=dq, keep_original=True, backend=backend)
    lp.inject(model, lp.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False), "a")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = model(IDS).logits
    rep = merge_quantized(model, "a", strategy="separate")  # never merges, as for the reference
    assert (rep.quantized_layers, rep.float_layers) == (0, 0)
    with pytest.raises(MergeStateError, match="on the fly"):
        lp.merge_and_unload(model, "a")
    layer = model.get_submodule("model.layers.0.mlp.up_proj")
    base = layer.base_layer
    want = base.backend.quantize(base.original_weight + layer.delta("a"), base.spec).tensors()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merge_quantized(model, "a", strategy="from_original")
    got = stored(base)
    assert all(torch.equal(got[k], want[k]) for k in want)
    lp.unmerge(model, "a")
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert torch.equal(model(IDS).logits, out)


# -- refusals ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,scheme,block,match", [
    pytest.param("bitsandbytes", "int8", 64, "'nf4' only", marks=BNB),
    pytest.param("bitsandbytes", "nf4", 32, "block_size", marks=BNB),
    pytest.param("torchao", "nf4", 64, "'int8' only", marks=TORCHAO),
    ("cuda-magic", "nf4", 64, "unknown quantization backend"),
])
def test_a_backend_that_cannot_run_the_spec_is_a_typed_error(backend, scheme, block, match):
    model = models.tiny_llama(seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(QuantConfigError, match=match):
        quantize_model(model, scheme, block_size=block, backend=backend)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(v, after[k]) for k, v in before.items())


@pytest.mark.parametrize("package", ["bitsandbytes", "torchao"])
def test_a_missing_package_names_the_extra(package, monkeypatch):
    monkeypatch.setitem(sys.modules, package, None)  # import of `package` raises ImportError
    scheme = "nf4" if package == "bitsandbytes" else "int8"
    with pytest.raises(MissingDependencyError, match=rf"pip install 'loraplex\[{package}\]'"):
        quantize_model(models.tiny_llama(seed=0), scheme, backend=package)


@TORCHAO
def test_cli_quantize_backend(tmp_path, capsys):
    assert main(["quantize", "--base", "tiny-llama", "--scheme", "int8", "--backend", "torchao",
                 "--out", str(tmp_path / "q")]) == 0
    want = models.tiny_llama()
    quantize_model(want, "int8", backend="torchao")
    got = load_quantized(models.tiny_llama(), tmp_path / "q")
    assert all(torch.equal(v, got.state_dict()[k]) for k, v in want.state_dict().items())
