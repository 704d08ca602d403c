"""NF4 weights: QLoRA's 4-bit NormalFloat, blockwise absmax, two codes packed per byte.

For a float weight W of any shape with N elements and a block size B (default 64):
    w       = flatten(W), zero-padded to nblocks * B elements, nblocks = ceil(N / B)
    a[k]    = max_j |w[k*B + j]|                              # (nblocks,) float32 absmax per block
    c[i]    = argmin_v |w[i] / a[i // B] - NF4[v]|            # (nblocks*B,) 4-bit code, 0..15
    packed  = (c[0::2] << 4) | c[1::2]                         # (nblocks*B/2,) uint8; first code in the high nibble
    W      ≈ NF4[c] * a[block]  (first N values, reshaped)
so W costs N/2 bytes (+ padding) + 4 bytes per block. The error per element is at most
a[block] * (half the gap between the two code-book values around it) <= a[block] * max_gap / 2.

Double quantization (QLoRA) stores the block absmax values themselves in 8 bits:
    offset     = mean(a)                                       # (1,) float32
    a - offset  is quantized with int8 absmax in blocks of SCALE_BLOCK = 256 (see int8.py):
    absmax_code (nblocks,) int8 and absmax_scale (ceil(nblocks / 256),) float32
which costs ~1 byte per block instead of 4. (QLoRA stores these codes with an 8-bit *float* map;
loraplex uses the linear int8 map of int8.py. Same storage cost; the error is bounded by absmax_scale / 2.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import QuantConfigError
from .int8 import Int8Weight, check_float_weight, quantize_int8

# The 16 NF4 values, in code order 0..15: the published constant of QLoRA (Dettmers et al., 2023,
# Appendix E). They are the normalized quantiles of N(0, 1): with p = (1 - 1/30 + 1 - 1/32) / 2,
# 8 positive quantiles ndtri(linspace(p, 1/2, 9)[:-1]), 7 negative ones -ndtri(linspace(p, 1/2, 8)[:-1])
# and an exact 0, divided by the largest (tests/quant/test_quant.py recomputes them this way).
NF4_CODEBOOK: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141149902,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236572,
    1.0,
)
ZERO_CODE = 7  # NF4_CODEBOOK[7] == 0.0; padding encodes to it
SCALE_BLOCK = 256  # block size of the double quantization of the absmax values


def nf4_codebook(device: torch.device | str | None = None) -> torch.Tensor:
    """The NF4 code book as a (16,) float32 tensor."""
    return torch.tensor(NF4_CODEBOOK, dtype=torch.float32, device=device)


def check_block_size(block_size: int) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2 or block_size % 2:
        raise QuantConfigError(
            f"NF4 block_size must be an even integer >= 2 (QLoRA uses 64), got {block_size!r}"
        )


@dataclass(frozen=True)
class NF4Weight:
    """A packed NF4 weight. Exactly one of `absmax` / (`absmax_code`, `absmax_scale`, `absmax_offset`) is set."""

    packed: torch.Tensor  # (nblocks * block_size / 2,) uint8, two 4-bit codes per byte, high nibble first
    shape: tuple[int, ...]  # shape of the float weight
    block_size: int
    absmax: torch.Tensor | None = None  # (nblocks,) float32; None with double quantization
    absmax_code: torch.Tensor | None = None  # (nblocks,) int8: double-quantized (absmax - offset)
    absmax_scale: torch.Tensor | None = None  # (ceil(nblocks / 256),) float32
    absmax_offset: torch.Tensor | None = None  # (1,) float32: mean of the absmax values

    @property
    def double_quant(self) -> bool:
        return self.absmax is None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @staticmethod
    def layout(
        shape: tuple[int, ...], block_size: int, double_quant: bool
    ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """{tensor name: (shape, dtype)} of the stored tensors for a float weight of `shape`."""
        check_block_size(block_size)
        nblocks = -(-math.prod(shape) // block_size)
        out = {"packed": ((nblocks * block_size // 2,), torch.uint8)}
        if double_quant:
            out["absmax_code"] = ((nblocks,), torch.int8)
            out["absmax_scale"] = ((-(-nblocks // SCALE_BLOCK),), torch.float32)
            out["absmax_offset"] = ((1,), torch.float32)
        else:
            out["absmax"] = ((nblocks,), torch.float32)
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        names = ("packed", "absmax", "absmax_code", "absmax_scale", "absmax_offset")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], shape: tuple[int, ...], block_size: int) -> NF4Weight:
        return cls(shape=tuple(shape), block_size=block_size, **tensors)

    def block_absmax(self) -> torch.Tensor:
        """The per-block absmax (nblocks,) float32 actually used by dequantize (after double quant)."""
        if self.absmax is not None:
            return self.absmax
        return _dequantize_scales(self.absmax_code, self.absmax_scale, self.absmax_offset)

    def codes(self) -> torch.Tensor:
        """Unpacked 4-bit codes (nblocks * block_size,) uint8, padding included."""
        hi = self.packed >> 4  # (nbytes,)
        lo = self.packed & 0x0F
        return torch.stack((hi, lo), dim=1).reshape(-1)  # (2 * nbytes,)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """NF4[code] * absmax[block] in float32, returned in `dtype` with the original shape."""
        book = nf4_codebook(self.packed.device)
        values = book[self.codes().to(torch.int32)].view(-1, self.block_size)  # (nblocks, B)
        values = values * self.block_absmax()[:, None]
        return values.reshape(-1)[: self.numel].reshape(self.shape).to(dtype)

    def nbytes(self) -> int:
        """Real storage bytes: packed codes + scales (+ double-quant scales and offset)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def quantize_nf4(weight: torch.Tensor, block_size: int = 64, double_quant: bool = False) -> NF4Weight:
    """Blockwise NF4 quantization of a float weight of any shape (see the module docstring).

    Does not modify `weight`. A block of zeros gets absmax 0 and dequantizes to exactly zero.
    """
    check_block_size(block_size)
    check_float_weight(weight, ndim=None)
    n = weight.numel()
    nblocks = -(-n // block_size)
    w = weight.detach().to(torch.float32).reshape(-1)  # (N,)
    w = F.pad(w, (0, nblocks * block_size - n)).view(nblocks, block_size)  # (nblocks, B)
    absmax = w.abs().amax(dim=1)  # (nblocks,)
    safe = torch.where(absmax == 0, torch.ones_like(absmax), absmax)
    normalized = w / safe[:, None]  # in [-1, 1]

    book = nf4_codebook(w.device)
    midpoints = (book[1:] + book[:-1]) / 2  # (15,) decision boundaries between neighbours
    codes = torch.bucketize(normalized.reshape(-1), midpoints).to(torch.uint8)  # (nblocks*B,) 0..15
    pairs = codes.view(-1, 2)
    packed = (pairs[:, 0] << 4) | pairs[:, 1]  # (nblocks*B/2,) uint8

    shape = tuple(weight.shape)
    if not double_quant:
        return NF4Weight(packed=packed, shape=shape, block_size=block_size, absmax=absmax)
    return double_quantize(NF4Weight(packed=packed, shape=shape, block_size=block_size, absmax=absmax))


def double_quantize(weight: NF4Weight) -> NF4Weight:
    """`weight` with its fp32 block absmax replaced by the double-quantized form (module docstring)."""
    if weight.double_quant:
        raise QuantConfigError("this NF4 weight is double-quantized already")
    code, scale, offset = _quantize_scales(weight.absmax)
    return NF4Weight(
        packed=weight.packed, shape=weight.shape, block_size=weight.block_size,
        absmax_code=code, absmax_scale=scale, absmax_offset=offset,
    )


def _quantize_scales(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization: (nblocks,) float32 -> codes (nblocks,) int8, scales (nb2,) f32, offset (1,) f32."""
    nblocks = absmax.numel()
    nb2 = -(-nblocks // SCALE_BLOCK)
    offset = absmax.mean().reshape(1)  # (1,)
    centered = F.pad(absmax - offset, (0, nb2 * SCALE_BLOCK - nblocks)).view(nb2, SCALE_BLOCK)
    q = quantize_int8(centered)  # per-row absmax int8 == per block of 256
    return q.qweight.reshape(-1)[:nblocks].clone(), q.scale, offset


def _dequantize_scales(code: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Inverse of _quantize_scales: (nblocks,) float32 absmax values."""
    nblocks = code.numel()
    padded = F.pad(code, (0, scale.numel() * SCALE_BLOCK - nblocks))  # (nb2*256,) int8
    rows = Int8Weight(qweight=padded.view(-1, SCALE_BLOCK), scale=scale, shape=(scale.numel(), SCALE_BLOCK))
    return rows.dequantize().reshape(-1)[:nblocks] + offset
