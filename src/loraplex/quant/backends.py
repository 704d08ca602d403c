"""Library backends of QuantLinear: bitsandbytes (NF4) and torchao (int8 weight-only).

A backend both quantizes the float weight and computes y = x @ deQ(W).T + b, over loraplex's OWN stored
layout (quant/int8.py, quant/nf4.py), so a layer built with any backend saves, loads, merges and unmerges
exactly as with the pure-PyTorch reference (backend "loraplex"), and LoRA wraps it the same way:

    bitsandbytes  nf4   quantize_4bit(W, blocksize=B, quant_type="nf4") gives the same code book, the same
                        packing (first code in the high nibble) and the same fp32 block absmax as
                        quantize_nf4: the packed bytes are stored as they come (zero-code padding to whole
                        blocks). With double_quant the absmax values are then quantized loraplex's way
                        (nf4.double_quantize), not bitsandbytes' 8-bit dynamic map, so files stay one layout.
                        Forward: bitsandbytes.matmul_4bit on the packed bytes. block_size must be one
                        bitsandbytes takes (BNB_BLOCK_SIZES). On CPU, in_features must be a multiple of
                        block_size: bitsandbytes 0.50's CPU 4-bit dequantize kernel indexes blocks per row,
                        so a block that straddles two rows dequantizes wrong (up to 2.0 off on a (40, 96)
                        weight, found by tests/quant/test_quant_backends.py); such a layer is refused. int8 is refused: bitsandbytes' int8 matmul
                        (LLM.int8()) quantizes the activations too, which is not x @ deQ(W).T.
    torchao       int8  Int8Tensor.from_hp(W, PerRow()): per-row symmetric absmax, scale = absmax / 127.5 and
                        codes in [-128, 127] (loraplex: absmax / 127, [-127, 127]); stored as Int8Weight
                        (W ~ q * scale, |W - q * scale| <= scale / 2). Forward: F.linear over an Int8Tensor.
                        nf4 is refused: torchao's NF4Tensor needs the block count divisible by its scaler
                        block, which most layers are not.

A backend whose package is missing raises MissingDependencyError naming the extra
(pip install 'loraplex[bitsandbytes]' / 'loraplex[torchao]'); one that cannot run the spec on the device
raises QuantConfigError saying what it supports.
"""

from __future__ import annotations

import importlib
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..errors import QuantConfigError
from ..extras import require
from .int8 import Int8Weight, check_float_weight
from .nf4 import NF4_CODEBOOK, ZERO_CODE, NF4Weight, double_quantize

if TYPE_CHECKING:
    from .linear import QuantSpec

BNB_BLOCK_SIZES = (64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' 4-bit kernels take on CPU and CUDA
DEVICE_TYPES = ("cpu", "cuda")  # where both libraries have kernels


class _LibraryBackend:
    """A library computing one `scheme` on DEVICE_TYPES: the checks both library backends share."""

    name: str
    library: str  # the package (and the backend's name in select_backend)
    scheme: str  # the one scheme it computes
    scheme_hint: str  # appended when another scheme is asked for: why not, and which backend has it

    def __init__(self) -> None:
        require(self.library, f"quantization backend '{self.library}'")  # MissingDependencyError without it

    def unsupported(self, spec: QuantSpec, device: torch.device, shape: tuple[int, int] | None = None) -> str | None:
        """Why this backend cannot run `spec` on `device` (for an (out, in) weight of `shape`), or None."""
        if spec.scheme != self.scheme:
            return (f"backend '{self.library}' computes scheme '{self.scheme}' only, got {spec.scheme!r}"
                    f"{self.scheme_hint}")
        reason = self.limits(spec, device, shape)
        if reason is None and device.type not in DEVICE_TYPES:
            return f"backend '{self.library}' runs on {DEVICE_TYPES}, got device {device}"
        return reason

    def limits(self, spec: QuantSpec, device: torch.device, shape: tuple[int, int] | None) -> str | None:
        """Why the library cannot run `spec` (of its scheme) on `device` for `shape`, beyond the scheme and
        device type; None by default."""
        return None

    def supports(self, spec: QuantSpec, device: torch.device) -> bool:
        return self.unsupported(spec, device) is None


class BitsAndBytesBackend(_LibraryBackend):
    """NF4 through bitsandbytes (see the module docstring)."""

    name, library, scheme = "bitsandbytes-nf4", "bitsandbytes", "nf4"
    scheme_hint = " (its int8 matmul quantizes the activations too); use backend 'torchao' or 'loraplex' for int8"

    def __init__(self) -> None:
        super().__init__()
        self._bnb = importlib.import_module("bitsandbytes")
        self._functional = importlib.import_module("bitsandbytes.functional")

    def limits(self, spec: QuantSpec, device: torch.device, shape: tuple[int, int] | None) -> str | None:
        """Block sizes its kernels take; on CPU, in_features a multiple of block_size."""
        if spec.block_size not in BNB_BLOCK_SIZES:
            return f"backend 'bitsandbytes' takes NF4 block_size in {BNB_BLOCK_SIZES}, got {spec.block_size}"
        if device.type == "cpu" and shape is not None and shape[1] % spec.block_size:
            return (f"backend 'bitsandbytes' on CPU needs in_features to be a multiple of block_size "
                    f"{spec.block_size} (its CPU kernel dequantizes blocks that straddle rows wrong), got a "
                    f"weight of shape {tuple(shape)}; use backend 'loraplex', or skip this module")
        return None

    def quantize(self, weight: torch.Tensor, spec: QuantSpec) -> NF4Weight:
        check_float_weight(weight, ndim=None)
        w = weight.detach().to(torch.float32).contiguous()
        packed, state = self._functional.quantize_4bit(w, blocksize=spec.block_size, quant_type="nf4")
        nblocks = -(-w.numel() // spec.block_size)
        pad = nblocks * spec.block_size // 2 - packed.numel()  # loraplex stores whole blocks: zero codes
        packed = F.pad(packed.reshape(-1), (0, pad), value=ZERO_CODE << 4 | ZERO_CODE)  # (nblocks*B/2,) uint8
        out = NF4Weight(packed=packed, shape=tuple(w.shape), block_size=spec.block_size,
                        absmax=state.absmax.to(torch.float32))
        return double_quantize(out) if spec.double_quant else out

    def linear(self, x: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None,
               dtype: torch.dtype) -> torch.Tensor:
        state = self._functional.QuantState(
            absmax=weight.block_absmax(), shape=torch.Size(weight.shape),
            code=torch.tensor(NF4_CODEBOOK, dtype=torch.float32, device=weight.packed.device),
            blocksize=weight.block_size, quant_type="nf4", dtype=dtype,
        )
        packed = weight.packed[: -(-math.prod(weight.shape) // 2)].view(-1, 1)  # bitsandbytes' ((N+1)//2, 1)
        return self._bnb.matmul_4bit(x, packed.t(), quant_state=state, bias=None if bias is None else bias.to(dtype))


class TorchAOBackend(_LibraryBackend):
    """int8 weight-only through torchao (see the module docstring); any weight shape."""

    name, library, scheme = "torchao-int8", "torchao", "int8"
    scheme_hint = "; use backend 'bitsandbytes' or 'loraplex' for nf4"

    def __init__(self) -> None:
        super().__init__()
        quantization = importlib.import_module("torchao.quantization")
        self._int8_tensor = quantization.Int8Tensor
        self._per_row = quantization.PerRow

    def quantize(self, weight: torch.Tensor, spec: QuantSpec) -> Int8Weight:
        check_float_weight(weight)
        out_features, in_features = weight.shape
        # torchao 0.18 fails on in_features == 1 (out > 1); a zero column leaves every row's absmax as it is
        w = F.pad(weight.detach().to(torch.float32), (0, 1 if in_features == 1 else 0))
        t = self._int8_tensor.from_hp(w, self._per_row())  # qdata: (out, in') int8; scale: (out, 1) float32
        return Int8Weight(qweight=t.qdata[:, :in_features].contiguous(), scale=t.scale.reshape(-1).to(torch.float32),
                          shape=(out_features, in_features))

    def linear(self, x: torch.Tensor, weight: Int8Weight, bias: torch.Tensor | None,
               dtype: torch.dtype) -> torch.Tensor:
        out_features, in_features = weight.shape
        w = self._int8_tensor(weight.qweight, weight.scale.to(dtype).reshape(out_features, 1),
                              block_size=[1, in_features], dtype=dtype)
        return F.linear(x, w, None if bias is None else bias.to(dtype))  # (..., out)


LIBRARY_BACKENDS = {"bitsandbytes": BitsAndBytesBackend, "torchao": TorchAOBackend}


def library_backend(
    library: str, spec: QuantSpec, device: torch.device, shape: tuple[int, int] | None = None
) -> BitsAndBytesBackend | TorchAOBackend:
    """The `library` backend for `spec` on `device` (and an (out, in) weight of `shape`, when given); typed
    errors when its package is missing or it cannot run them."""
    backend = LIBRARY_BACKENDS[library]()  # MissingDependencyError without the package
    reason = backend.unsupported(spec, device, shape)
    if reason is not None:
        raise QuantConfigError(reason)
    return backend

