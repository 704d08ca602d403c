"""The LoRA math, once, as pure functions. Layers, merge, combine and the runtime all call these.

Shapes follow PEFT's layout (so files interoperate):
    lora_A: (r, in_features)      lora_B: (out_features, r)
    delta W = scale * B @ A : (out_features, in_features)
    y = x @ W.T + scale * (x @ A.T) @ B.T
with scale = lora_alpha / r, or lora_alpha / sqrt(r) for rsLoRA.
"""

from __future__ import annotations

import math
from typing import Callable, Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import ConfigError, UnsupportedModuleError

try:  # GPT-2 style Conv1D: weight stored (in, out); optional so plain-torch use needs no transformers
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency, kept optional for plain torch users
    Conv1D = None  # type: ignore[assignment,misc]

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


# -- weight layout of linear-like layers, decided by type (never guessed from shapes) ------------------------
WeightLayout = Literal["out_in", "in_out"]


def weight_layout(module: nn.Module) -> WeightLayout:
    """How a linear-like module stores its weight: "in_out" (in, out) for GPT-2's Conv1D (PEFT's fan_in_fan_out),
    "out_in" (out, in) for nn.Linear and loraplex QuantLinear. UnsupportedModuleError for any other type."""
    from .quant.linear import QuantLinear  # lazy: loraplex.quant imports store, which imports this module

    if Conv1D is not None and isinstance(module, Conv1D):
        return "in_out"
    if isinstance(module, (nn.Linear, QuantLinear)):
        return "out_in"
    raise UnsupportedModuleError(f"expected a linear-like module (nn.Linear, transformers Conv1D, loraplex "
                                 f"QuantLinear), got {type(module).__name__}")


def out_in(t: torch.Tensor, layout: WeightLayout) -> torch.Tensor:
    """A weight-shaped matrix between storage `layout` and (out, in): t.T for "in_out", else t (its own inverse)."""
    return t.T if layout == "in_out" else t


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like module (see `weight_layout`)."""
    if weight_layout(module) == "in_out":
        fin, fout = module.weight.shape  # Conv1D stores (in, out)
        return fin, fout
    return module.in_features, module.out_features


# -- merge with a bit-exact restore ----------------------------------------------------------------------------
# A merge W' = f(W) rounds to W's dtype, so g(W') (g the inverse map: W' - delta, or DoRA's W' / g - delta) may
# differ from W in a few elements. The residual keeps those elements' original values, so a restore is bit-exact:
#     merged, restored, residual = exact_merge(W, f, g);  exact_restore(merged, g, residual) == W  (bitwise)
Residual = tuple[torch.Tensor, torch.Tensor]  # (flat indices (k,), original values (k,)), k usually tiny


def exact_merge(weight: torch.Tensor, forward: Callable[[torch.Tensor], torch.Tensor],
                back: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, Residual]:
    """(merged, restored, residual): merged = forward(W) and restored = back(merged), both computed in
    promote(W.dtype, float32) and stored in W's dtype; residual = the elements where restored != W, with W's
    values. W is not modified. Same shape and layout as W throughout."""
    compute = torch.promote_types(weight.dtype, torch.float32)
    merged = forward(weight.to(compute)).to(weight.dtype)
    restored = back(merged.to(compute)).to(weight.dtype)
    idx = (restored != weight).flatten().nonzero().squeeze(1)
    return merged, restored, (idx, weight.flatten()[idx].clone())


def exact_restore(merged: torch.Tensor, back: Callable[[torch.Tensor], torch.Tensor],
                  residual: Optional[Residual]) -> torch.Tensor:
    """back(merged) in merged's dtype (computed as in `exact_merge`), with the residual's elements put back:
    the original W bit for bit when `residual` came from the `exact_merge` that made `merged`."""
    compute = torch.promote_types(merged.dtype, torch.float32)
    restored = back(merged.to(compute)).to(merged.dtype)
    if residual is not None:
        idx, values = residual
        restored.view(-1)[idx] = values
    return restored


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


def lora_linear(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float,
                lora_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The LoRA path of a linear layer: scale * ((x @ A.T) @ B.T + b) ; x: (..., in) -> (..., out); b (out,) is
    PEFT's LoRA-B bias (lora_bias), None for none."""
    return F.linear(F.linear(x, lora_A), lora_B, lora_bias) * scale


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


def _scaled_rows(t: torch.Tensor, scale: float) -> torch.Tensor:
    """A NEW row-major copy of scale * t (t is small: an adapter factor; never modified)."""
    return t.clone(memory_format=torch.contiguous_format).mul_(scale)


class _LinearWithLora(torch.autograd.Function):
    """y = x @ W.T + bias + scale * (x @ A.T) @ B.T as ONE autograd node; W and bias are constants (frozen).

    Against the generic path (base linear, then `lora_linear_add`), backward skips autograd's sum of the two
    input gradients (dx = dy @ W, then += (scale * dy @ B) @ A in place, one addmm) and orders the two skinny
    products the way MKL runs them fastest: dy @ B with B.T stored row-major, and dB = (h.T @ dy).T with
    h = x @ A.T saved from forward; on CPU at training sizes up to ~1.3x and ~1.9x faster than the plain
    `dy @ B` / `dy.T @ h` (bench/bench_lora_ops.py). Shapes: x (..., in), W (out, in), A (r, in), B (out, r).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                lora_B: torch.Tensor, scale: float) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        h = torch.mm(x2, lora_A.t())  # (N, r)
        bt = _scaled_rows(lora_B.t(), scale)  # (r, out) = scale * B.T, row-major; backward reuses it
        y = torch.mm(h, bt) if bias is None else torch.addmm(bias, h, bt)  # (N, out): the delta (+ bias) ...
        y.addmm_(x2, weight.t())  # ... onto which the base GEMM accumulates (beta=1: no extra pass over y)
        ctx.save_for_backward(x2, h, weight, lora_A, bt)
        ctx.scale, ctx.x_shape = scale, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x2, h, weight, lora_A, bt = ctx.saved_tensors
        need_x, _, _, need_a, need_b, _ = ctx.needs_input_grad
        g = grad.reshape(-1, grad.shape[-1])  # (N, out)
        dx = da = db = None
        if need_x or need_a:
            gh = torch.mm(g, bt.t())  # (N, r) = scale * dy @ B
            if need_a:
                da = torch.mm(gh.t(), x2)  # (r, in)
            if need_x:
                dx = torch.mm(gh, lora_A).addmm_(g, weight).view(ctx.x_shape)  # (..., in), base GEMM last
        if need_b:
            db = torch.mm(h.t(), g).mul_(ctx.scale).t().contiguous()  # (out, r) = scale * dy.T @ h
        return dx, None, None, da, db, None


def linear_with_lora(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                     lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """x @ W.T + bias + scale * (x @ A.T) @ B.T for a FROZEN W (out, in) and bias, as one autograd node.

    Equals `lora_linear_add(F.linear(x, W, bias), x, A, B, scale)` up to float rounding, with the faster
    backward of `_LinearWithLora`; gradients flow to x, A and B only. All tensors share one dtype.
    """
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ConfigError("linear_with_lora: expected a frozen base weight and bias (requires_grad=False); "
                          "use the base layer and lora_linear_add for a trainable base")
    return _LinearWithLora.apply(x, weight, bias, lora_A, lora_B, scale)


def lora_embedding(
    ids: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float, **embedding_kwargs: object
) -> torch.Tensor:
    """The LoRA path of an embedding: scale * A.T[ids] @ B.T.

    lora_A: (r, num_embeddings), lora_B: (embedding_dim, r); ids: (...) -> (..., embedding_dim).
    `embedding_kwargs` are the base embedding's padding_idx/max_norm/... options.
    """
    return F.embedding(ids, lora_A.T, **embedding_kwargs) @ lora_B.T * scale


# -- DoRA (weight-decomposed LoRA, PEFT's `use_dora`) -------------------------------------------------------
# W' = m * (W + s B A) / ||W + s B A||_row : the direction is LoRA's, the per-output-row length is m (out,).
# With g = m / ||W + s B A||_row (out,), detached from autograd as in PEFT and the DoRA paper (section 4.3):
#     y = g * (x @ W.T + s (x @ A.T) @ B.T) + bias
# g depends on the adapter only (not on the input), so a server computes it once per adapter.
# Convolutions (PEFT's DoRA for Conv1d/2d) use the same formulas with W and delta flattened to (out, in * prod(k))
# and g broadcast over the output's spatial dimensions.


def dora_weight_norm(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """||W + delta|| per output row, detached: weight and delta (out, in) -> (out,) (PEFT's `get_weight_norm`)."""
    return torch.linalg.norm((weight + delta).detach(), dim=1)


def dora_scale(magnitude: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
               scale: float) -> torch.Tensor:
    """g = m / ||W + scale * B @ A||_row : magnitude (out,) (a conv's (1, out, 1[, 1])), weight (out, in[, *k]),
    A (r, in[, *k]), B (out, r[, 1, 1]) -> (out,).

    Computed in the dtype of `lora_A` (the adapter's, as PEFT does); the norm carries no gradient, m does.
    """
    dtype = lora_A.dtype
    delta = scale * (lora_B.detach().flatten(1) @ lora_A.detach().flatten(1))  # (out, in * prod(k))
    return magnitude.flatten() / dora_weight_norm(weight.flatten(1).to(dtype), delta).to(magnitude.dtype)


def dora_add(result: torch.Tensor, base_out: torch.Tensor, lora_out: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """result + (g - 1) * base_out + g * lora_out  (PEFT's DoRA term, added onto `result`).

    result: the base layer's output (bias included); base_out: W applied to x' WITHOUT bias, where x' is the
    input the LoRA path sees (x itself, or its dropout in training); lora_out: the scaled LoRA path on x';
    g: from `dora_scale`, shaped to broadcast over the feature dimension ((out,) for (..., out) outputs,
    (out, 1[, 1]) for a conv's (N, out, *spatial)). Without dropout this is g * (result - bias + lora_out) + bias.
    """
    return result + (g - 1) * base_out + g * lora_out


def dora_merged_weight(weight: torch.Tensor, delta: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The merged DoRA weight g * (W + delta), rows scaled: weight, delta (out, in), g (out,) -> (out, in)."""
    return g.unsqueeze(1) * (weight + delta)


def dora_unmerged_weight(merged: torch.Tensor, delta: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Inverse of `dora_merged_weight`: merged / g - delta (up to rounding) -> (out, in)."""
    return merged / g.unsqueeze(1) - delta


# -- initializations that read or make orthogonal bases (PEFT's init_lora_weights; layers.LoraLinear._init) -----

def orthogonal_factors(in_features: int, out_features: int, r: int, generator: Optional[torch.Generator] = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's "orthogonal" init (r even): Q from QR of an (r, r) Gaussian; A = (G1 (in, r/2) @ Q[0::2]).T / 10
    (r, in), B = G2 (out, r/2) @ Q[1::2] / 10 (out, r). The rows of Q are orthonormal, so B @ A = 0 exactly in
    exact arithmetic while both factors are non-zero."""
    if r % 2:
        raise ConfigError(f"init_lora_weights='orthogonal' needs an even rank (A and B take half of an orthogonal "
                          f"basis each), got r={r}")
    q = torch.linalg.qr(torch.randn(r, r, generator=generator))[0]  # (r, r)
    a = (torch.randn(in_features, r // 2, generator=generator) @ q[0::2]).T / 10.0  # (r, in)
    b = torch.randn(r // 2, out_features, generator=generator).T @ q[1::2] / 10.0  # (out, r)
    return a, b


def residual_factors(weight: torch.Tensor, r: int, scale: float, init: str,
                     generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, in), B (out, r)) in fp32 of a residual init from weight W (out, in); the base then becomes
    W - scale * B @ A (the caller writes it):
        "pissa":           W = U S Vh (SVD), A = diag(sqrt(S_r / scale)) @ Vh_r, B = U_r @ diag(sqrt(S_r / scale))
        "pissa_niter_<N>": the same from torch.svd_lowrank(W, r, niter=N) (randomized; probe from `generator`)
        "olora":           W = Q R (QR), A = R[:r], B = Q[:, :r]
    """
    w = weight.float()
    if init == "olora":
        q, rr = torch.linalg.qr(w)  # (out, k), (k, in)
        return rr[:r], q[:, :r]
    if init == "pissa":
        u, sv, vh = torch.linalg.svd(w, full_matrices=False)
        u, sv, vh = u[:, :r], sv[:r], vh[:r]
    else:
        u, sv, v = _svd_lowrank(w, r, int(init.rpartition("_")[2]), generator)
        vh = v.T
    root = torch.sqrt(sv / scale)  # (r,)
    return root[:, None] * vh, u * root


def _svd_lowrank(w: torch.Tensor, r: int, niter: int, generator: Optional[torch.Generator]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch.svd_lowrank(w, r, niter) -> (U (out, r), S (r,), V (in, r)); its random probe is drawn from
    `generator` (via a seed for a forked global RNG, which svd_lowrank uses) when one is given."""
    if generator is None:
        return torch.svd_lowrank(w, q=r, niter=niter)
    devices = [w.device] if w.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
        return torch.svd_lowrank(w, q=r, niter=niter)
