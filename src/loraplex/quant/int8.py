"""int8 weights: per-output-channel (per-row) absmax quantization.

For a weight W of shape (out, in):
    s[o]    = max_i |W[o, i]| / 127                  # (out,) float32
    q[o, i] = clamp(round(W[o, i] / s[o]), -127, 127)  # (out, in) int8
    W ≈ q * s[:, None]                               # |W - q * s| <= s / 2 elementwise
A row of zeros gets s = 0 and q = 0 (it dequantizes to exactly zero).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import NonFiniteError, ShapeMismatchError

QMAX = 127  # symmetric range [-127, 127]; -128 is never used so that negation is exact


def check_float_weight(weight: torch.Tensor, ndim: int | None = 2) -> None:
    """Raise a typed error unless `weight` is a finite floating-point tensor (of `ndim` dims, when given)."""
    if not weight.is_floating_point():
        raise ShapeMismatchError(f"expected a floating-point weight to quantize, got dtype {weight.dtype}")
    if ndim is not None and weight.dim() != ndim:
        raise ShapeMismatchError(
            f"expected a {ndim}-D weight (out_features, in_features), got shape {tuple(weight.shape)}"
        )
    if weight.numel() == 0:
        raise ShapeMismatchError(f"cannot quantize an empty weight (shape {tuple(weight.shape)})")
    if not bool(torch.isfinite(weight).all()):
        raise NonFiniteError("the weight to quantize holds NaN or Inf; quantizing it would store garbage")


@dataclass(frozen=True)
class Int8Weight:
    """A quantized (out, in) weight; W ≈ qweight * scale[:, None]."""

    qweight: torch.Tensor  # (out, in) int8
    scale: torch.Tensor  # (out,) float32, absmax_row / 127
    shape: tuple[int, int]  # (out, in) of the float weight

    # -- the names and shapes the tensors take in a state dict (see QuantLinear) --
    @staticmethod
    def layout(shape: tuple[int, int]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """{tensor name: (shape, dtype)} of the stored tensors for a float weight of `shape`."""
        out_features, in_features = shape
        return {"qweight": ((out_features, in_features), torch.int8), "scale": ((out_features,), torch.float32)}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.qweight, "scale": self.scale}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], shape: tuple[int, int]) -> Int8Weight:
        return cls(qweight=tensors["qweight"], scale=tensors["scale"], shape=tuple(shape))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """q * s in float32, returned in `dtype`: (out, in)."""
        return (self.qweight.to(torch.float32) * self.scale[:, None]).to(dtype)

    def nbytes(self) -> int:
        """Real storage bytes: out*in (int8) + 4*out (float32 scales)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def quantize_int8(weight: torch.Tensor) -> Int8Weight:
    """Per-output-channel absmax int8 quantization of a float weight (out, in). Does not modify `weight`."""
    check_float_weight(weight)
    w = weight.detach().to(torch.float32)  # (out, in)
    scale = w.abs().amax(dim=1) / QMAX  # (out,)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)  # zero rows: q = 0 / 1 = 0
    q = torch.round(w / safe[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)  # (out, in)
    return Int8Weight(qweight=q, scale=scale, shape=(w.shape[0], w.shape[1]))
