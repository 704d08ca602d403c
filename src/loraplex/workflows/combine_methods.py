"""The rules `combine` applies at one module, as functions of the inputs' factors (combine.py's docstring has
the semantics of each method). Each input is a `ModuleLora`, delta = scale * B @ A with A (r, in'), B (out, r)
once flattened (in' = in * prod(k)); each rule returns the new factors A_out (r_out, in'), B_out (out, r_out)
of scale 1 and its relative Frobenius error:

    cat_factors       [A_1; A_2], [w_1 s_1 B_1, w_2 s_2 B_2]        (exact)
    linear_factors    PEFT's "linear" (equal ranks), error vs sum_i w_i D_i
    svd_of_product, truncate    U S Vh of B @ A from the factors, kept to rank r
    pruned_sum        the dense merged delta of ties / dare_* / magnitude_prune (magnitude_mask, dare_mask)
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

import torch

from ..errors import IncompatibleAdaptersError
from ..functional import delta_weight
from .extract import COMPUTE


@dataclass
class ModuleLora:
    """One adapter's LoRA at one module; delta = scale * B @ A (factors flattened to 2-D)."""

    kind: str
    a: torch.Tensor  # (r, in[, *k]) as stored
    b: torch.Tensor  # (out, r[, 1, 1]) as stored
    scale: float

    @property
    def a2(self) -> torch.Tensor:
        return self.a.to(COMPUTE).flatten(1)  # (r, in * prod(k))

    @property
    def b2(self) -> torch.Tensor:
        return self.b.to(COMPUTE).flatten(1)  # (out, r)

    def delta(self) -> torch.Tensor:
        return delta_weight(self.a2, self.b2, self.scale)  # (out, in * prod(k))


def cat_factors(mods: list[ModuleLora], ws: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """A = [A_1; A_2; ...] (sum r_i, in'), B = [w_1 s_1 B_1, w_2 s_2 B_2, ...] (out, sum r_i): B @ A = sum_i w_i D_i."""
    a = torch.cat([x.a2 for x in mods], dim=0)  # (sum r_i, in')
    b = torch.cat([(w * x.scale) * x.b2 for x, w in zip(mods, ws)], dim=1)  # (out, sum r_i)
    return a, b


def linear_factors(module: str, present: list[tuple[int, ModuleLora]], ws: list[float], paths: Sequence[str],
                   a_cat: torch.Tensor, b_cat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """PEFT's "linear" at `module` over (input index, its LoRA) pairs `present` with weights `ws`: A = sum_i c_i A_i,
    B = sum_i sign(w_i) c_i B_i, c_i = sqrt(|w_i| s_i); error = distance from cat's exact sum `b_cat @ a_cat`.
    Refuses unequal ranks (IncompatibleAdaptersError naming the inputs by `paths`, indexed as `present`)."""
    ranks = {paths[i]: x.a.shape[0] for i, x in present}
    if len(set(ranks.values())) > 1:
        raise IncompatibleAdaptersError(
            f"method 'linear' adds the A's and the B's, so it needs equal ranks, but module {module!r} has ranks "
            f"{ranks}; use 'cat' (exact, rank = sum of ranks) or 'svd' (exact sum truncated to the rank you choose)")
    cs = [math.sqrt(abs(w) * x.scale) for w, (_, x) in zip(ws, present)]
    a = sum(c * x.a2 for c, (_, x) in zip(cs, present))  # (r, in')
    b = sum(math.copysign(c, w) * x.b2 for c, w, (_, x) in zip(cs, ws, present))  # (out, r)
    target = _fro(b_cat, a_cat)
    err = _fro(torch.cat([b, -b_cat], 1), torch.cat([a, a_cat], 0)) / target if target > 0 else 0.0
    return a, b, err


def _fro(b: torch.Tensor, a: torch.Tensor) -> float:
    """||b @ a||_F without forming the product: trace((b^T b)(a a^T)), both (R, R) and symmetric."""
    return math.sqrt(max(float(((b.T @ b) * (a @ a.T)).sum()), 0.0))


def svd_of_product(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of b @ a from its factors: b (out, R), a (R, in) -> U (out, k), S (k,), Vh (k, in), k = min(out, in, R)."""
    qb, rb = torch.linalg.qr(b)  # (out, k1), (k1, R)
    qa, ra = torch.linalg.qr(a.T)  # (in, k2), (k2, R)
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)  # (k1, k), (k,), (k, k2)
    return qb @ u, s, vh @ qa.T


def truncate(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Keep the top r (at most len(s)) components: A = Vh[:r], B = U[:, :r] * S[:r]; relative Frobenius error."""
    r = min(r, s.shape[0])
    total = float(s.pow(2).sum())
    err = math.sqrt(float(s[r:].pow(2).sum()) / total) if total > 0 else 0.0
    return vh[:r], u[:, :r] * s[:r], err


def magnitude_mask(d: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask of the k = ceil(density * numel) entries of largest |d| (at least one)."""
    k = max(1, math.ceil(density * d.numel() - 1e-9))  # the epsilon keeps 0.3 * 10 at 3, not 4
    mask = torch.zeros(d.numel(), dtype=torch.bool)
    mask[d.abs().flatten().topk(k).indices] = True
    return mask.view(d.shape)


def dare_mask(shape: Sequence[int], density: float, seed: int, module: str, index: int,
              device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """DARE's keep-mask for input adapter `index` at `module`: True with probability `density`, drawn from a
    CPU generator seeded by sha256(seed|module|index), so it depends on neither the order nor the set of
    modules; drawn on the CPU and then moved to `device`, so it is the same mask whatever the device."""
    digest = hashlib.sha256(f"{seed}|{module}|{index}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:7], "little"))
    return (torch.rand(tuple(shape), generator=gen, dtype=COMPUTE) < density).to(device)


def pruned_sum(method: str, module: str, present: list[tuple[int, ModuleLora]], ws: list[float], density: float,
               seed: int) -> torch.Tensor:
    """The merged dense delta of pruning method `method` (combine.py's docstring), (out, in * prod(k))."""
    kept = []
    for (i, x), w in zip(present, ws):
        d = x.delta()
        if method in ("magnitude_prune", "ties"):
            d = d * magnitude_mask(d, density)
        else:
            d = d * dare_mask(d.shape, density, seed, module, i, d.device) / density
        kept.append(w * d)
    t = torch.stack(kept)  # (n, out, in')
    if method in ("magnitude_prune", "dare_linear"):
        return t.sum(0)
    elected = torch.where(t.sum(0) >= 0, 1.0, -1.0).to(t.dtype)  # (out, in')
    agree = torch.sign(t) == elected  # zeros never agree
    return (t * agree).sum(0) / agree.sum(0).clamp(min=1)
