"""Obvious, slow reference implementations of loraplex.quant (element by element, plain Python loops).

The fast code in src/loraplex/quant is tested against these. Nothing here is vectorized on purpose.
"""

from __future__ import annotations

import math

import torch

# The published NF4 code book (QLoRA, Dettmers et al. 2023, Appendix E), code order 0..15.
NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141149902, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236572, 1.0,
]


def f32(v: float) -> float:
    """Round a Python float to float32 (the fast code computes in float32)."""
    return torch.tensor(v, dtype=torch.float32).item()


def nf4_construction() -> list[float]:
    """The NF4 values recomputed from their definition: normalized quantiles of N(0, 1), with an exact 0."""
    p = 0.5 * ((1 - 1 / (2 * 15)) + (1 - 1 / (2 * 16)))
    ndtri = lambda q: torch.special.ndtri(torch.tensor(q, dtype=torch.float64)).item()  # noqa: E731
    pos = [ndtri(p + (0.5 - p) * i / 8) for i in range(8)]  # linspace(p, 0.5, 9)[:-1]
    neg = [-ndtri(p + (0.5 - p) * i / 7) for i in range(7)]  # linspace(p, 0.5, 8)[:-1]
    values = sorted(pos + neg + [0.0])
    return [v / max(values) for v in values]


# ------------------------------------------------------------------------------------------------ int8
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row by row: s = absmax / 127, q = round(w / s). Returns q (out, in) int8 and s (out,) float32."""
    out_features, in_features = w.shape
    q = torch.zeros(out_features, in_features, dtype=torch.int8)
    s = torch.zeros(out_features, dtype=torch.float32)
    for o in range(out_features):
        row = w[o].to(torch.float32)
        absmax = max(abs(v) for v in row.tolist())
        scale = torch.tensor(absmax, dtype=torch.float32) / 127
        s[o] = scale
        for i in range(in_features):
            q[o, i] = 0 if absmax == 0 else int(torch.round(row[i] / scale).clamp(-127, 127).item())
    return q, s


def dequantize_int8(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(q.shape, dtype=torch.float32)
    for o in range(q.shape[0]):
        for i in range(q.shape[1]):
            out[o, i] = float(q[o, i]) * s[o]
    return out


# ------------------------------------------------------------------------------------------------- nf4
def quantize_nf4(w: torch.Tensor, block_size: int) -> tuple[list[int], list[float]]:
    """Codes (padded to whole blocks, padding = the code of 0.0) and the per-block absmax values."""
    flat = w.to(torch.float32).reshape(-1)
    n = flat.numel()
    nblocks = math.ceil(n / block_size)
    codes, absmax = [], []
    for k in range(nblocks):
        block = flat[k * block_size : (k + 1) * block_size]
        a = block.abs().max()  # float32 tensor
        absmax.append(a.item())
        for j in range(block_size):
            x = (block[j] / a).item() if (j < block.numel() and a.item() != 0) else 0.0
            codes.append(min(range(16), key=lambda c: abs(x - NF4[c])))
    return codes, absmax


def pack(codes: list[int]) -> torch.Tensor:
    """Two codes per byte, the first in the high nibble."""
    return torch.tensor([codes[i] * 16 + codes[i + 1] for i in range(0, len(codes), 2)], dtype=torch.uint8)


def unpack(packed: torch.Tensor) -> list[int]:
    out = []
    for byte in packed.tolist():
        out += [byte // 16, byte % 16]
    return out


def dequantize_nf4(codes: list[int], absmax: list[float], block_size: int, shape: tuple[int, ...]) -> torch.Tensor:
    n = math.prod(shape)
    values = [f32(NF4[codes[i]]) * f32(absmax[i // block_size]) for i in range(n)]
    return torch.tensor(values, dtype=torch.float64).to(torch.float32).reshape(shape)


def double_quantize(absmax: list[float], block: int = 256) -> tuple[list[int], list[float], float]:
    """(absmax - mean) quantized to int8 in blocks of `block`, each with its own absmax / 127 scale."""
    a = torch.tensor(absmax, dtype=torch.float32)
    mean = a.mean()
    centered = a - mean
    codes, scales = [], []
    for k in range(0, len(absmax), block):
        chunk = centered[k : k + block]
        q, s = quantize_int8(chunk.reshape(1, -1))
        codes += q[0].tolist()
        scales.append(s[0].item())
    return codes, scales, mean.item()


def double_dequantize(codes: list[int], scales: list[float], mean: float, block: int = 256) -> list[float]:
    return [f32(f32(c * f32(scales[i // block])) + f32(mean)) for i, c in enumerate(codes)]


# ---------------------------------------------------------------------------------------------- linear
def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """y = x @ w.T + b, in float64."""
    y = x.double() @ w.double().T
    return y if b is None else y + b.double()
