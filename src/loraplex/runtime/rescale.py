"""DoRA rows of a batch plan: a per-row, per-output-feature affine map applied after the LoRA terms.

A DoRA adapter d at a layer with base weight W (out, in) and bias b computes (PEFT's formula, see
loraplex.functional):
    y = g * (x @ W.T + scale * (x @ A.T) @ B.T) + b          g = m / ||W + scale B A||_row   (out,)
      = g * (base(x) + lora(x)) + c                           c = (1 - g) * b                 (out,)
g and c depend on the adapter and the base only, not on the input, so the pool stores them per adapter as
one (2, out) tensor [g; c] (computed once when the adapter is loaded). A plan applies, for every row b whose
assignment holds a DoRA slot d, AFTER adding the row's LoRA terms:
    y[b] = g_d * y[b] + c_d
Rule (the only one that is defined): a row holds at most one DoRA slot, at weight 1.0; any plain-LoRA slots
beside it are inside the rescaled sum (the engine uses this only to take a merged plain adapter back out).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from ..errors import AdapterFileError, UnsupportedFeatureError
from ..functional import dora_scale
from ..store import AdapterFile, lora_modules
from .rows import stack_rows

# (slot, layer_key) -> that slot's [g; c] (2, out) at the layer, or None when the slot is plain LoRA there.
RescaleSource = Callable[[int, str], "torch.Tensor | None"]


@dataclass(slots=True)
class RescaleLayer:
    """One layer's DoRA rows: y[rows[i]] = gc[u[i], 0] * y[rows[i]] + gc[u[i], 1]."""

    rows: torch.Tensor | None  # (n,) int64 DoRA rows of the batch; None = every row
    gc: torch.Tensor  # (U, 2, out) [g; c] of each distinct DoRA assignment present
    u: torch.Tensor | None  # (n,) int64 row -> index into gc; None when U == 1

    def apply_(self, y: torch.Tensor) -> None:
        """y: (B, L, out), in place."""
        gc = self.gc[0] if self.u is None else self.gc.index_select(0, self.u)  # (2, out) or (n, 2, out)
        g, c = gc.unbind(-2)  # (out,) or (n, out)
        if g.dim() == 2:
            g, c = g.unsqueeze(1), c.unsqueeze(1)  # (n, 1, out): broadcast over the row's tokens
        if self.rows is None:
            y.mul_(g).add_(c)
        else:
            y.index_copy_(0, self.rows, torch.addcmul(c, y.index_select(0, self.rows), g))


def dora_rescales(af: AdapterFile, tensors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                  scales: Mapping[str, float],
                  base: Callable[[str], tuple[torch.Tensor, torch.Tensor | None]]) -> dict[str, torch.Tensor]:
    """A DoRA adapter's {key: [g; c] (2, out)} for the pool ({} for plain LoRA), in float32 or wider.

    tensors / scales: the adapter's {key: (A (r, in), B (out, r))} and {key: scale}; base(key) -> (W (out, in),
    bias (out,) or None): the BARE base weight (no merged adapter inside) and bias of that layer.
    """
    if not af.config.use_dora:
        return {}
    magnitudes = {k: x.magnitude for k, x in lora_modules(af).items()}
    out = {}
    for key, (A, B) in tensors.items():
        m = magnitudes.get(key)
        if m is None or tuple(m.shape) != (B.shape[0],):
            raise AdapterFileError(f"DoRA adapter {str(af.path)!r} at {key!r}: expected a lora_magnitude_vector of "
                                   f"shape ({B.shape[0]},), got {None if m is None else tuple(m.shape)}")
        w, bias = base(key)
        compute = torch.promote_types(A.dtype, torch.float32)
        dev = w.device
        g = dora_scale(m.to(dev, compute), w.to(compute), A.to(dev, compute), B.to(dev, compute), scales[key])
        c = torch.zeros_like(g) if bias is None else (1 - g) * bias.detach().to(compute)
        out[key] = torch.stack([g, c])  # (2, out)
    return out


def dora_slot(get: RescaleSource, assignment: Sequence[tuple[int, float]], key: str) -> torch.Tensor | None:
    """The [g; c] of the assignment's DoRA slot at layer `key`, or None; refuses what the rule leaves undefined."""
    found = [(s, w, t) for s, w in assignment if (t := get(s, key)) is not None]
    if not found:
        return None
    if len(found) > 1 or found[0][1] != 1.0:
        raise UnsupportedFeatureError(
            f"a row mixes DoRA slot(s) {[(s, w) for s, w, _ in found]} at layer {key!r}: a DoRA adapter rescales "
            "its row's whole output, so it is served alone at weight 1.0 (or beside plain LoRA at weight 1.0)"
        )
    return found[0][2]


def rescale_layer(per_u: list[torch.Tensor | None], row_u: list[int], fout: int,
                  device: torch.device, dtype: torch.dtype) -> RescaleLayer | None:
    """Build one layer's RescaleLayer: per_u[u] is distinct assignment u's [g; c] (or None), row_u[b] row b's u."""
    stacked = stack_rows(per_u, row_u, (2, fout), "a DoRA [g; c] tensor", device, dtype)
    return None if stacked is None else RescaleLayer(*stacked)
