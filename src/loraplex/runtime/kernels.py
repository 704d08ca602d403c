"""Dense projections of the compact decoder: y = x @ W.T (+ b), x (..., in) -> y (..., out), with the kernel
picked once per model when the weights are read (never per call):

  "aten"    F.linear on the weight as stored (x86 CPU fp32: MKL's sgemm).
  "onednn"  the weight reordered once into oneDNN's blocked layout (torch.ops.mkldnn._reorder_linear_weight, the
            layout torch.compile's CPU weight prepacking uses), then torch.ops.mkldnn._linear_pointwise. On the
            project's AMD Zen 5 CPU a SmolLM2 projection at 5-256 rows runs 2-3x faster in fp32 than MKL's sgemm
            and ~1.4x faster in bf16 than F.linear (bench/bench_decode.py). Costs one copy of the weights.
"auto" is "onednn" on a CPU whose oneDNN build computes the dtype natively (fp32; bf16 with AVX-512 BF16 or
AMX), else "aten". Both compute in the weight's dtype with fp32 accumulation; they differ by rounding only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ConfigError, UnsupportedFeatureError

KERNELS = ("auto", "aten", "onednn")


def onednn_supports(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the "onednn" kernel runs natively for weights of `dtype` on `device`."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if not all(hasattr(torch.ops.mkldnn, op) for op in ("_linear_pointwise", "_reorder_linear_weight")):
        return False
    if dtype == torch.float32:
        return True
    native_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()  # not emulated
    return dtype == torch.bfloat16 and native_bf16 and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pick_kernel(kernel: str, device: torch.device, dtype: torch.dtype) -> str:
    """The kernel to use for `kernel` in KERNELS ("auto" resolved); refuses "onednn" where it cannot run."""
    if kernel not in KERNELS:
        raise ConfigError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    ok = onednn_supports(device, dtype)
    if kernel == "onednn" and not ok:
        raise UnsupportedFeatureError(
            f"kernel 'onednn' needs a CPU oneDNN build that computes {dtype} natively (fp32, or bf16 with "
            f"AVX-512 BF16/AMX); got device {device}; use kernel='aten' or 'auto'")
    return "onednn" if kernel == "auto" and ok else ("aten" if kernel == "auto" else kernel)


def _onednn_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [None], "")


def _onednn_linear_fake(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], w.shape[0])  # (..., out)


# The "onednn" projection as an opaque op for compiled graphs: x (..., in), w oneDNN-blocked (out, in). Defined on a
# plain torch.library.Library rather than with torch.library.custom_op: in a compiled SmolLM2 decode step the
# custom_op wrapper cost ~55 us per call (6.8 ms a step, more than the fusion saved), this one ~4 us.
_LIB = torch.library.Library("loraplex", "DEF")
_LIB.define("onednn_linear(Tensor x, Tensor w, Tensor? b) -> Tensor")
_LIB.impl("onednn_linear", _onednn_linear, "CompositeExplicitAutograd")  # every backend, the oneDNN weight's too
torch.library.register_fake("loraplex::onednn_linear", _onednn_linear_fake, lib=_LIB)
onednn_linear = torch.ops.loraplex.onednn_linear


def _onednn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    if torch.compiler.is_compiling():  # inductor cannot lower the op on a weight it did not pack itself
        return onednn_linear(x, w, b)
    return _onednn_linear(x, w, b)


@dataclass(frozen=True)
class Projection:
    """One dense projection (or several fused along out): call it on x (..., in) -> (..., out)."""

    weight: torch.Tensor  # (out, in): as given for "aten", oneDNN-blocked (opaque) for "onednn"
    bias: torch.Tensor | None  # (out,)
    shape: tuple[int, int]  # (in_features, out_features)
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, self.weight, self.bias)


def projection(weight: torch.Tensor, bias: torch.Tensor | None, kernel: str) -> Projection:
    """A Projection of weight (out, in) and bias (out,) for a resolved kernel ("aten" shares the tensors)."""
    shape = (weight.shape[1], weight.shape[0])
    if kernel == "aten":
        return Projection(weight, bias, shape, F.linear)
    if kernel != "onednn":
        raise ConfigError(f"projection() takes a resolved kernel ('aten' or 'onednn'), got {kernel!r}")
    return Projection(torch.ops.mkldnn._reorder_linear_weight(weight.contiguous()), bias, shape, _onednn)
