"""Incremental PCA over batches of activations, as PEFT 0.21.2's `peft.utils.incremental_pca.IncrementalPCA`
runs it for EVA (lowrank=True, q = 2 * n_components, niter = 4, seed 42), op for op so the same batches give the
same components (scikit-learn's algorithm: Ross et al. 2008, with the mean correction of Chan et al.).

After batches X_1..X_t (each (n_i, d)) have been seen, with n = sum n_i, mean m and per-feature variance v:
    components   (k, d)  the top-k right-singular vectors of the centered data seen so far, signs fixed so the
                         largest-|.| entry of each row is positive (svd_flip, v-based)
    singular_values (k,), explained_variance_ratio (k,) = S**2 / sum(v * n)
Each update runs a randomized SVD (torch.svd_lowrank under its own seed) of
    [S[:, None] * components;  X_t - mean(X_t);  sqrt(n_prev * n_t / n) * (m_prev - mean(X_t))]
so memory stays O((k + n_t) * d). The first update works in float32, later ones in float64 (the mean is float64).
"""

from __future__ import annotations

from typing import Optional

import torch

LOWRANK_SEED = 42  # PEFT's SVDHook seed
LOWRANK_NITER = 4


class IncrementalPCA:
    """Top-`n_components` principal directions of a stream of (n_i, d) batches (see the module docstring)."""

    def __init__(self, n_components: int) -> None:
        self.n_components = n_components
        self.q = 2 * n_components  # svd_lowrank's oversampled rank
        self.components: Optional[torch.Tensor] = None  # (k, d)
        self.singular_values: Optional[torch.Tensor] = None  # (k,)
        self.explained_variance_ratio: Optional[torch.Tensor] = None  # (k,)
        self.mean: Optional[torch.Tensor] = None  # (d,) float64
        self.var: Optional[torch.Tensor] = None  # (d,) float64
        self.n_seen: Optional[torch.Tensor] = None  # (1,) int64

    def partial_fit(self, x: torch.Tensor) -> None:
        """Fold the batch x (n, d), n >= n_components, d >= n_components, into the estimate."""
        x = x.to(torch.float32).clone()
        n = x.shape[0]
        first = self.components is None
        if first:
            self.n_seen = torch.tensor([0], device=x.device)
        mean, var, total = _mean_and_var(x, self.mean, self.var, self.n_seen)
        if first:
            x -= mean
        else:
            batch_mean = torch.mean(x, dim=0)
            x -= batch_mean
            correction = torch.sqrt((self.n_seen.double() / total) * n) * (self.mean - batch_mean)  # (d,) float64
            x = torch.vstack((self.singular_values.view(-1, 1) * self.components, x, correction))
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            torch.manual_seed(LOWRANK_SEED)
            _, s, v = torch.svd_lowrank(x, q=self.q, niter=LOWRANK_NITER)
        vt = v.mH  # (q, d)
        signs = torch.sign(vt[range(vt.shape[0]), torch.argmax(torch.abs(vt), dim=1)])  # svd_flip, v-based
        vt = vt * signs.view(-1, 1)
        self.n_seen = total
        self.components = vt[: self.n_components]
        self.singular_values = s[: self.n_components]
        self.mean, self.var = mean, var
        self.explained_variance_ratio = (s**2 / torch.sum(var * total))[: self.n_components]


def _mean_and_var(x: torch.Tensor, last_mean: Optional[torch.Tensor], last_var: Optional[torch.Tensor],
                  last_n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Running per-feature mean and (biased) variance after batch x (n, d), summed in float64 (Chan et al.)."""
    n_new = torch.tensor([x.shape[0]], device=x.device)
    total = last_n + n_new
    if last_mean is None:
        last_sum = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    else:
        last_sum = last_mean * last_n
    new_sum = x.sum(dim=0, dtype=torch.float64)
    mean = (last_sum + new_sum) / total
    centered = x - new_sum / n_new
    correction = centered.sum(dim=0, dtype=torch.float64).square()
    new_unnormalized = centered.square().sum(dim=0, dtype=torch.float64) - correction / n_new
    if last_var is None:
        return mean, new_unnormalized / total, total
    ratio = last_n.double() / n_new
    unnormalized = last_var * last_n + new_unnormalized + ratio / total * (last_sum / ratio - new_sum).square()
    return mean, unnormalized / total, total
