"""What one `AdapterPool` slot holds, the checks an adapter passes to get one, and how it comes back.

`pool_tensors` turns an adapter file (decoded by `store.lora_modules`) into what `AdapterPool.add` takes.
A slot holds one version of one adapter (`SlotEntry`): per layer (A (r, in), Bt (r, out)) in the pool's
dtype and device, its scales, a fingerprint of the stored bits, and (DoRA) [g; c] (2, out) per layer.
`check_tensors` / `check_dora` refuse what the pool cannot serve (unknown layer, wrong shape, rank 0,
NaN/Inf) before anything is stored; `reload` brings an evicted slot's tensors back and refuses content
whose fingerprint differs from the one taken at `add` (a replaced file on disk).
The pool itself (names, leases, budget, eviction, plans) is `loraplex.runtime.pool`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..errors import (
    AdapterFileError,
    ConfigError,
    LoraplexError,
    NonFiniteError,
    ShapeMismatchError,
    TargetNotFoundError,
    UnsupportedFeatureError,
)
from ..store import AdapterFile, lora_modules
from .embedding import served_tensors

LayerTensors = Mapping[str, tuple[torch.Tensor, torch.Tensor]]  # layer key -> (A (r, in), B (out, r))
Loader = Callable[[str, str], LayerTensors]  # (name, content_hash) -> that content's tensors
Stored = dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer key -> (A (r, in), Bt (r, out)), as stored


@dataclass
class SlotEntry:
    name: str
    content_hash: str
    version: int
    scales: dict[str, float]  # layer key -> scale
    shapes: dict[str, tuple[int, int, int]]  # layer key -> (r, in, out)
    fingerprint: dict[str, tuple[int, int]]  # layer key -> (hash(A), hash(B)) in the pool dtype
    nbytes: int  # fast-tier bytes when resident
    # stored per layer as (A (r, in), Bt (r, out)), both contiguous: B is kept transposed, the layout the
    # batched matmuls read fastest; `AdapterPool.tensors()` hands B back as the (out, r) view Bt.T
    fast: Stored | None  # None = evicted
    slow: Stored | None  # CPU copy (fast tier off-CPU, no loader)
    refs: int = 0  # outstanding leases
    retired: bool = False  # the name now points elsewhere (replaced or removed); freed when refs == 0
    dora: dict[str, torch.Tensor] = field(default_factory=dict)  # DoRA layers: key -> [g; c] (2, out), never evicted


def pool_tensors(af: AdapterFile, layers: Mapping[str, tuple[int, int]], base: nn.Module | None = None
                 ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, float]]:
    """An adapter file as AdapterPool input: ({key: (A (r, in), B (out, r))}, {key: scale}), key = module name
    (e.g. "model.layers.0.self_attn.q_proj"); refuses anything but LoRA on the registered layers `layers`
    {key: (in, out)} (linear projections, and embeddings: A (r, vocab), B (dim, r)), DoRA's magnitudes (which
    `runtime.rescale` turns into [g; c]) and trainable tokens, which become exact LoRA factors on the embedding and
    a tied head (`runtime.embedding.token_tensors`, from `base`: the HF model the pool serves)."""
    cfg, what = af.config, f"adapter {str(af.path)!r}"
    if cfg.modules_to_save or cfg.bias != "none" or cfg.fan_in_fan_out:
        raise UnsupportedFeatureError(f"{what}: the server applies LoRA on linear projections only; "
                                      "modules_to_save, bias training and fan_in_fan_out are not served")
    modules = lora_modules(af)
    tensors, scales, extra = served_tensors(af, base, modules)
    if extra:
        raise UnsupportedFeatureError(f"{what} holds {extra[0]!r}: only LoRA of linear and embedding layers and "
                                      "trainable tokens are served (no DoRA embeddings, no extra weights)")
    missing = [key for key in tensors if key not in layers]
    if missing:
        raise TargetNotFoundError(f"{what} targets {missing[0]!r}, which the serving model has no layer for; it serves "
                                  f"the embedding, the output head and q/k/v/o/gate/up/down_proj of each layer")
    if not tensors:
        raise AdapterFileError(f"{what} holds no LoRA tensors")
    return tensors, scales


def check_tensors(
    name: str, tensors: LayerTensors, scales: Mapping[str, float], layers: Mapping[str, tuple[int, int]]
) -> tuple[dict[str, tuple[int, int, int]], dict[str, float]]:
    """({key: (r, in, out)}, {key: scale}) of an adapter, checked against the registered {key: (in, out)}."""
    if not tensors:
        raise ConfigError(f"adapter {name!r} has no tensors")
    if set(scales) != set(tensors):
        raise ConfigError(
            f"adapter {name!r}: scales must have exactly the layer keys of tensors; "
            f"missing {sorted(set(tensors) - set(scales))}, extra {sorted(set(scales) - set(tensors))}"
        )
    shapes, scl = {}, {}
    for key, (A, B) in tensors.items():
        if key not in layers:
            raise TargetNotFoundError(
                f"adapter {name!r} targets layer {key!r}, which is not registered; "
                f"registered: {sorted(layers)[:8]}{'...' if len(layers) > 8 else ''}"
            )
        fin, fout = layers[key]
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != fin or B.shape[0] != fout or A.shape[0] != B.shape[1]:
            raise ShapeMismatchError(
                f"adapter {name!r} layer {key!r}: expected lora_A (r, {fin}) and lora_B ({fout}, r), "
                f"got {tuple(A.shape)} and {tuple(B.shape)}"
            )
        if A.shape[0] == 0:
            raise ShapeMismatchError(f"adapter {name!r} layer {key!r}: rank must be >= 1, got 0")
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise NonFiniteError(f"adapter {name!r} layer {key!r}: lora_A or lora_B holds NaN/Inf")
        s = float(scales[key])
        if not math.isfinite(s):
            raise NonFiniteError(f"adapter {name!r} layer {key!r}: scale must be finite, got {s}")
        shapes[key], scl[key] = (A.shape[0], fin, fout), s
    return shapes, scl


def check_dora(name: str, dora: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, int, int]], *,
               dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """Validated fast-tier copies of a DoRA adapter's {key: [g; c] (2, out)}."""
    out = {}
    for key, t in dora.items():
        if key not in shapes:
            raise ConfigError(f"adapter {name!r}: DoRA tensor for layer {key!r}, which has no lora_A/lora_B")
        if tuple(t.shape) != (2, shapes[key][2]):
            raise ShapeMismatchError(f"adapter {name!r} layer {key!r}: DoRA [g; c] must be "
                                     f"(2, {shapes[key][2]}), got {tuple(t.shape)}")
        if not torch.isfinite(t).all():
            raise NonFiniteError(f"adapter {name!r} layer {key!r}: DoRA scale holds NaN/Inf")
        out[key] = torch.empty(t.shape, dtype=dtype, device=device).copy_(t.detach())
    return out


def to_fast(tensors: LayerTensors, *, dtype: torch.dtype, device: torch.device) -> Stored:
    """Caller's {key: (A, B)} -> fast-tier {key: (A, Bt)}: always copies, so later changes to the
    caller's tensors never reach the pool."""
    def copy(t: torch.Tensor) -> torch.Tensor:
        out = torch.empty(t.shape, dtype=dtype, device=device)
        return out.copy_(t.detach())

    return {k: (copy(A), copy(B.T)) for k, (A, B) in tensors.items()}


def fingerprint(fast: Stored) -> dict[str, tuple[int, int]]:
    """Per layer, an xor-hash of A's and B's bits (as stored): a cheap check that a reload is the same."""
    def h(t: torch.Tensor) -> int:
        return int(torch.hash_tensor(t).view(torch.int64))  # uint64 bits, as a Python int

    return {k: (h(A), h(B)) for k, (A, B) in fast.items()}


def reload(e: SlotEntry, loader: Loader | None, *, dtype: torch.dtype, device: torch.device) -> Stored:
    """The fast-tier tensors of evicted `e`: from its CPU copy, else from `loader`; must match `e.fingerprint`."""
    if e.slow is not None:
        fast = {k: tuple(t.to(device, non_blocking=True) for t in pair) for k, pair in e.slow.items()}
    else:
        try:
            loaded = loader(e.name, e.content_hash)
        except (LoraplexError, OSError, KeyError, ValueError) as err:  # the files are gone or changed
            raise AdapterFileError(f"reloading adapter {e.name!r} ({e.content_hash}) failed: {err}") from err
        if set(loaded) != set(e.shapes):
            raise AdapterFileError(
                f"loader returned layers {sorted(loaded)[:4]}... for {e.name!r}, expected {sorted(e.shapes)[:4]}..."
            )
        fast = to_fast(loaded, dtype=dtype, device=device)
    got = {k: (tuple(A.shape), tuple(Bt.shape)) for k, (A, Bt) in fast.items()}
    if got != {k: ((r, fin), (r, fout)) for k, (r, fin, fout) in e.shapes.items()} or (
        fingerprint(fast) != e.fingerprint
    ):
        raise AdapterFileError(
            f"reloaded adapter {e.name!r} does not match the content {e.content_hash} it was added with "
            "(the loader must return the tensors of that exact content hash, not the latest file)"
        )
    return fast
