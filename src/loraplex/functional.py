"""The LoRA math, once, as pure functions. Layers, merge, combine and the runtime all call these.

Shapes follow PEFT's layout (so files interoperate):
    lora_A: (r, in_features)      lora_B: (out_features, r)
    delta W = scale * B @ A : (out_features, in_features)
    y = x @ W.T + scale * (x @ A.T) @ B.T
with scale = lora_alpha / r, or lora_alpha / sqrt(r) for rsLoRA.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import ConfigError

# Tolerances for comparing two computations of the same quantity, keyed by dtype: (atol, rtol).
# Every test and every parity report in loraplex uses this one table.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-5, 1e-4),
    torch.bfloat16: (3e-2, 2e-2),
    torch.float16: (5e-3, 5e-3),
}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) for comparing results computed in `dtype` (see TOLERANCES)."""
    if dtype not in TOLERANCES:
        raise ConfigError(f"no tolerance defined for dtype {dtype}; expected one of {list(TOLERANCES)}")
    return TOLERANCES[dtype]


def scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """Scale applied to B @ A: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    if r <= 0:
        raise ConfigError(f"rank r must be a positive integer, got {r}")
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def delta_weight(lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * B @ A for linear-like layers: (out, r) @ (r, in) -> (out, in).

    Computed in at least float32 and returned in A's dtype so bf16 merges do not lose the product's precision.
    """
    compute = torch.promote_types(lora_A.dtype, torch.float32)
    return (scale * (lora_B.to(compute) @ lora_A.to(compute))).to(lora_A.dtype)


def conv_delta_weight(lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """Delta of a Conv{1,2}d LoRA: A is (r, in, *k), B is (out, r, 1[, 1]) -> (out, in, *k).

    The LoRA path is conv(x, A) followed by a 1x1 conv with B, which equals one conv with kernel B·A.
    """
    compute = torch.promote_types(lora_A.dtype, torch.float32)
    a = lora_A.to(compute).flatten(1)  # (r, in*prod(k))
    b = lora_B.to(compute).flatten(1)  # (out, r)
    return (scale * (b @ a)).reshape(lora_B.shape[0], *lora_A.shape[1:]).to(lora_A.dtype)


def lora_linear(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """The LoRA path of a linear layer: scale * (x @ A.T) @ B.T ; x: (..., in) -> (..., out)."""
    return F.linear(F.linear(x, lora_A), lora_B) * scale


def lora_linear_add(result: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """result + scale * (x @ A.T) @ B.T, i.e. `result + lora_linear(x, A, B, scale)` up to float rounding.

    The B product, the scale and the sum run as ONE addmm (GEMM with alpha=scale accumulating onto `result`),
    so neither forward nor backward makes a (..., out) temporary for the delta or its scaling; the backward
    is two small GEMMs. result: (..., out), x: (..., in); all four tensors share one dtype.
    """
    h = F.linear(x, lora_A)  # (..., r)
    out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), lora_B.t(), alpha=scale)
    return out.view(result.shape)  # (N, out) -> (..., out)


def lora_embedding(
    ids: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float, **embedding_kwargs: object
) -> torch.Tensor:
    """The LoRA path of an embedding: scale * A.T[ids] @ B.T.

    lora_A: (r, num_embeddings), lora_B: (embedding_dim, r); ids: (...) -> (..., embedding_dim).
    `embedding_kwargs` are the base embedding's padding_idx/max_norm/... options.
    """
    return F.embedding(ids, lora_A.T, **embedding_kwargs) @ lora_B.T * scale
