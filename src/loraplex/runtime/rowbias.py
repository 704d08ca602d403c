"""LoRA-B biases (PEFT's lora_bias) in a batch plan: a per-row, per-output-feature term added with the LoRA terms.

An adapter with lora_bias has, at each layer it targets, a bias b (out,) on lora_B; PEFT's layer computes
    y = base(x) + scale * (x @ A.T @ B.T + b)
so for a row b asking for ((s_1, w_1), ..., (s_k, w_k)) the plan adds, beside the LoRA products,
    y[b] += sum_k w_k * scale_k * b_{s_k}          (a constant over the row's tokens)
Mixes are linear in the bias like in A and B (each component at its own weight); base-only rows get nothing.
The pool keeps each slot's b per layer in the fast tier for the slot's life (out values per layer; eviction
drops A and B only).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from ..errors import AdapterFileError
from ..store import AdapterFile, LoraModule
from .rows import stack_rows

BIAS_SUFFIX = ".lora_B.bias"
# (slot, layer_key) -> (b (out,), scale) of that slot at the layer, or None when it has no LoRA-B bias there.
BiasSource = Callable[[int, str], "tuple[torch.Tensor, float] | None"]


@dataclass(slots=True)
class BiasLayer:
    """One layer's biased rows: y[rows[i]] += bias[u[i]] at every token."""

    rows: torch.Tensor | None  # (n,) int64 rows with a bias term; None = every row
    bias: torch.Tensor  # (U, out) sum_k w_k * scale_k * b_k of each distinct assignment present, in the plan dtype
    u: torch.Tensor | None  # (n,) int64 row -> index into bias; None when U == 1

    def apply_(self, y: torch.Tensor) -> None:
        """y: (B, L, out), in place."""
        b = self.bias[0] if self.u is None else self.bias.index_select(0, self.u).unsqueeze(1)  # (out,) or (n, 1, out)
        if self.rows is None:
            y.add_(b)
        else:
            y.index_add_(0, self.rows, b.expand(self.rows.shape[0], y.shape[1], y.shape[2]).to(y.dtype))


def lora_biases(af: AdapterFile, modules: Mapping[str, LoraModule]) -> dict[str, torch.Tensor]:
    """{module: b (out,)} of an adapter file with lora_bias ({} without); refuses a config that says lora_bias
    and lacks a module's bias, or a bias of the wrong shape (AdapterFileError, naming the file)."""
    if not af.config.lora_bias:
        return {}
    out = {}
    for key, m in modules.items():
        b = af.tensors.get(key + BIAS_SUFFIX)
        if b is None or tuple(b.shape) != (m.b.shape[0],):
            raise AdapterFileError(f"adapter {str(af.path)!r} has lora_bias=true; expected {key + BIAS_SUFFIX!r} of "
                                   f"shape ({m.b.shape[0]},), got {None if b is None else tuple(b.shape)}")
        out[key] = b
    return out


def bias_keys(biases: Mapping[str, torch.Tensor]) -> list[str]:
    """The file keys (prefix stripped) the biases of `lora_biases` were read from."""
    return [key + BIAS_SUFFIX for key in biases]


def row_bias(get: BiasSource, assignment: Sequence[tuple[int, float]], key: str) -> torch.Tensor | None:
    """sum_k w_k * scale_k * b_k (out,) of one assignment at `key` in float32 (or wider), None without a bias."""
    terms = [(w * t[1], t[0]) for s, w in assignment if (t := get(s, key)) is not None]
    if not terms:
        return None
    compute = torch.promote_types(terms[0][1].dtype, torch.float32)
    return sum(c * b.to(compute) for c, b in terms)


def bias_layer(per_u: list[torch.Tensor | None], row_u: list[int], fout: int,
               device: torch.device, dtype: torch.dtype) -> BiasLayer | None:
    """Build one layer's BiasLayer: per_u[u] is distinct assignment u's summed bias (or None), row_u[b] row b's u."""
    stacked = stack_rows(per_u, row_u, (fout,), "a LoRA-B bias", device, dtype)
    return None if stacked is None else BiasLayer(*stacked)
