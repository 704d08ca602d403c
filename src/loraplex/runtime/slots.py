"""What one `AdapterPool` slot holds, the checks an adapter passes to get one, and how it comes back.

`pool_tensors` turns an adapter file (decoded by `store.lora_modules`) into what `AdapterPool.add` takes
(`PoolInput`).
A slot holds one version of one adapter (`SlotEntry`): per layer (A (r, in), Bt (r, out)) in the pool's
dtype and device, its scales, a fingerprint of the stored bits, (DoRA) [g; c] (2, out) per layer and
(lora_bias) b (out,) per layer.
`check_tensors` / `check_dora` / `check_bias` refuse what the pool cannot serve (unknown layer, wrong shape, rank 0,
NaN/Inf) before anything is stored; `reload` brings an evicted slot's tensors back and refuses content
whose fingerprint differs from the one taken at `add` (a replaced file on disk).
The pool itself (names, leases, budget, eviction, plans) is `loraplex.runtime.pool`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

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
from .saved_modules import saved_copies

LayerTensors = Mapping[str, tuple[torch.Tensor, torch.Tensor]]  # layer key -> (A (r, in), B (out, r))
# (name, content_hash) -> that content's tensors; a PoolInput (pool_tensors) also brings modules_to_save copies back
Loader = Callable[[str, str], "LayerTensors | PoolInput"]
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
    bias: dict[str, torch.Tensor] = field(default_factory=dict)  # lora_bias layers: key -> b (out,), never evicted
    # modules_to_save copies {module: {param: tensor}} in the fast tier (counted in nbytes; {} while evicted)
    saved: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    saved_keys: frozenset[str] = frozenset()  # the modules it holds copies of (kept while evicted)
    saved_fingerprint: dict[str, int] = field(default_factory=dict)  # "module.param" -> hash of the stored bits
    slow_saved: dict[str, dict[str, torch.Tensor]] | None = None  # CPU copy of `saved` (like `slow`)

    @property
    def kept_bytes(self) -> int:
        """Fast-tier bytes held for the slot's whole life (DoRA [g; c], LoRA-B biases: eviction keeps them)."""
        return _nbytes([*self.dora.values(), *self.bias.values()])

    def lora(self, key: str) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(A (r, in), B (out, r), scale) at layer `key` (B as a view of the stored Bt), None without LoRA there."""
        if key not in self.shapes:
            return None
        A, Bt = self.fast[key]
        return A, Bt.T, self.scales[key]


class CheckedAdapter(NamedTuple):
    """An adapter checked for a slot (`check_adapter`), before any of its A / B is stored."""

    shapes: dict[str, tuple[int, int, int]]  # key -> (r, in, out)
    scales: dict[str, float]  # key -> scale
    dora: dict[str, torch.Tensor]  # fast-tier [g; c] (2, out) per DoRA layer
    bias: dict[str, torch.Tensor]  # fast-tier b (out,) per lora_bias layer
    saved: dict[str, dict[str, torch.Tensor]]  # fast-tier modules_to_save copies
    nbytes: int  # fast-tier bytes of A, B and the copies (what eviction frees)
    kept_bytes: int  # fast-tier bytes of dora and bias (held while the slot lives)


class PoolInput(NamedTuple):
    """An adapter file as `AdapterPool.add` input (see `pool_tensors`)."""

    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # key -> (A (r, in), B (out, r))
    scales: dict[str, float]  # key -> scale
    bias: dict[str, torch.Tensor]  # key -> LoRA-B bias b (out,) (lora_bias adapters)
    copies: dict[str, dict[str, torch.Tensor]]  # module key -> modules_to_save copy (its state dict)


def pool_tensors(af: AdapterFile, layers: Mapping[str, tuple[int, int]],
                 module: Callable[[str], nn.Module | None] | None = None, places: Collection[str] = (),
                 base: nn.Module | None = None) -> PoolInput:
    """An adapter file as AdapterPool input, key = module name (e.g. "model.layers.0.self_attn.q_proj"): LoRA on
    the registered layers `layers` {key: (in, out)} (linear projections, and embeddings: A (r, vocab), B (dim, r);
    DoRA's magnitudes are left to `runtime.rescale`), trainable tokens as exact LoRA factors on the embedding and
    a tied head (from `base`: the HF model the pool serves; runtime.embedding.served_tensors), LoRA-B biases, and
    modules_to_save copies of the modules named in `places` (`module(key)`: the base's module, for checking them;
    runtime.saved_modules). Refuses everything else with a typed error."""
    cfg, what = af.config, f"adapter {str(af.path)!r}"
    if cfg.bias != "none" or cfg.fan_in_fan_out:
        raise UnsupportedFeatureError(f"{what}: bias training (bias='all'/'lora_only') and fan_in_fan_out are not "
                                      "served (trained base biases change the base every row shares)")
    modules = lora_modules(af)
    tensors, scales, bias, rest = served_tensors(af, base, modules)
    if rest and module is None:
        raise UnsupportedFeatureError(f"{what} holds {rest[0]!r}: only LoRA factors, lora_B biases and trainable "
                                      "tokens are served here (no extra weights)")
    copies = saved_copies(af, rest, module) if rest else {}
    homeless = sorted(set(copies) - set(places))
    if homeless:
        raise UnsupportedFeatureError(f"{what} holds a modules_to_save copy of {homeless[0]!r}, which the serving "
                                      "decoder has no per-row place for: it serves copies of lm_head and of its RMS "
                                      "norms (model.norm, each layer's input/post_attention_layernorm) only")
    missing = [key for key in tensors if key not in layers]
    if missing:
        raise TargetNotFoundError(f"{what} targets {missing[0]!r}, which the serving model has no layer for; it serves "
                                  f"the embedding, the output head and q/k/v/o/gate/up/down_proj of each layer")
    if not tensors:
        raise AdapterFileError(f"{what} holds no LoRA tensors")
    return PoolInput(tensors, scales, bias, copies)


def check_adapter(name: str, tensors: LayerTensors, scales: Mapping[str, float],
                  dora: Mapping[str, torch.Tensor], bias: Mapping[str, torch.Tensor],
                  saved: Mapping[str, Mapping[str, torch.Tensor]], layers: Mapping[str, tuple[int, int]], *,
                  dtype: torch.dtype, device: torch.device) -> CheckedAdapter:
    """Everything `AdapterPool.add` takes, checked (check_tensors, check_dora, check_saved, check_bias) against
    the registered layers {key: (in, out)}, with the fast-tier bytes it will take in `dtype`."""
    shapes, scl = check_tensors(name, tensors, scales, layers)
    gc = check_dora(name, dora, shapes, dtype=dtype, device=device)
    copies = check_saved(name, saved, dtype=dtype, device=device)
    nbytes = sum(r * (fin + fout) * dtype.itemsize for r, fin, fout in shapes.values())
    nbytes += _nbytes([t for params in copies.values() for t in params.values()])  # evicted with A and B
    lb = check_bias(name, bias, shapes, dtype=dtype, device=device)
    return CheckedAdapter(shapes, scl, gc, lb, copies, nbytes, _nbytes([*gc.values(), *lb.values()]))


def new_entry(name: str, content_hash: str, version: int, tensors: LayerTensors, checked: CheckedAdapter, *,
              dtype: torch.dtype, device: torch.device, cpu_copy: bool) -> SlotEntry:
    """A resident slot for `tensors` (copied into the fast tier) as `check_adapter` checked them; cpu_copy: keep
    a (pinned, where CUDA is) CPU copy too, for an off-CPU pool with no loader to bring it back from."""
    fast = to_fast(tensors, dtype=dtype, device=device)
    slow = slow_saved = None
    if cpu_copy:
        pin = torch.cuda.is_available()
        slow = {k: tuple(t.to("cpu").pin_memory() if pin else t.to("cpu") for t in pair) for k, pair in fast.items()}
        slow_saved = {k: {p: t.to("cpu").pin_memory() if pin else t.to("cpu") for p, t in params.items()}
                      for k, params in checked.saved.items()}
    return SlotEntry(name, content_hash, version, checked.scales, checked.shapes, fingerprint(fast), checked.nbytes,
                     fast, slow, dora=checked.dora, bias=checked.bias, saved=checked.saved,
                     saved_keys=frozenset(checked.saved), saved_fingerprint=copies_fingerprint(checked.saved),
                     slow_saved=slow_saved)


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
    return _per_layer(name, dora, shapes, "DoRA [g; c]", lambda out: (2, out), dtype=dtype, device=device)


def check_bias(name: str, bias: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, int, int]], *,
               dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """Validated fast-tier copies of an adapter's LoRA-B biases {key: b (out,)}."""
    return _per_layer(name, bias, shapes, "LoRA-B bias", lambda out: (out,), dtype=dtype, device=device)


def _per_layer(name: str, tensors: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, int, int]],
               what: str, want: Callable[[int], tuple[int, ...]], *, dtype: torch.dtype,
               device: torch.device) -> dict[str, torch.Tensor]:
    """Fast-tier copies of per-layer extras {key: tensor of shape want(out_features)}: each for a layer with
    lora_A/lora_B (`shapes`: key -> (r, in, out)), of that shape, finite."""
    out = {}
    for key, t in tensors.items():
        if key not in shapes:
            raise ConfigError(f"adapter {name!r}: {what} for layer {key!r}, which has no lora_A/lora_B")
        if tuple(t.shape) != want(shapes[key][2]):
            raise ShapeMismatchError(f"adapter {name!r} layer {key!r}: {what} must be {want(shapes[key][2])}, "
                                     f"got {tuple(t.shape)}")
        if not torch.isfinite(t).all():
            raise NonFiniteError(f"adapter {name!r} layer {key!r}: {what} holds NaN/Inf")
        out[key] = torch.empty(t.shape, dtype=dtype, device=device).copy_(t.detach())
    return out


def check_saved(name: str, saved: Mapping[str, Mapping[str, torch.Tensor]], *, dtype: torch.dtype,
                device: torch.device) -> dict[str, dict[str, torch.Tensor]]:
    """Fast-tier copies of an adapter's modules_to_save copies {module: {param: tensor}} (floating tensors in the
    pool's dtype); the caller checked them against the base's modules (runtime.saved_modules.saved_copies)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, params in saved.items():
        out[key] = {}
        for p, t in params.items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise NonFiniteError(f"adapter {name!r}: its modules_to_save copy {key}.{p} holds NaN/Inf")
            dt = dtype if t.is_floating_point() else t.dtype
            out[key][p] = torch.empty(t.shape, dtype=dt, device=device).copy_(t.detach())
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
    return {k: (_hash(A), _hash(B)) for k, (A, B) in fast.items()}


def copies_fingerprint(saved: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, int]:
    """Per "module.param" of modules_to_save copies, an xor-hash of its bits (as stored)."""
    return {f"{k}.{p}": _hash(t) for k, params in saved.items() for p, t in params.items()}


def _nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _hash(t: torch.Tensor) -> int:
    return int(torch.hash_tensor(t).view(torch.int64))  # uint64 bits, as a Python int


def reload(e: SlotEntry, loader: Loader | None, *, dtype: torch.dtype, device: torch.device
           ) -> tuple[Stored, dict[str, dict[str, torch.Tensor]]]:
    """The fast-tier tensors and modules_to_save copies of evicted `e`: from its CPU copy, else from `loader`;
    both must match the fingerprints taken at add."""
    if e.slow is not None:
        fast = {k: tuple(t.to(device, non_blocking=True) for t in pair) for k, pair in e.slow.items()}
        saved = {k: {p: t.to(device, non_blocking=True) for p, t in params.items()}
                 for k, params in (e.slow_saved or {}).items()}
    else:
        try:
            loaded = loader(e.name, e.content_hash)
        except (LoraplexError, OSError, KeyError, ValueError) as err:  # the files are gone or changed
            raise AdapterFileError(f"reloading adapter {e.name!r} ({e.content_hash}) failed: {err}") from err
        tensors, copies = (loaded.tensors, loaded.copies) if isinstance(loaded, PoolInput) else (loaded, {})
        if set(tensors) != set(e.shapes):
            raise AdapterFileError(
                f"loader returned layers {sorted(tensors)[:4]}... for {e.name!r}, expected {sorted(e.shapes)[:4]}..."
            )
        fast = to_fast(tensors, dtype=dtype, device=device)
        saved = check_saved(e.name, copies, dtype=dtype, device=device)
    got = {k: (tuple(A.shape), tuple(Bt.shape)) for k, (A, Bt) in fast.items()}
    if got != {k: ((r, fin), (r, fout)) for k, (r, fin, fout) in e.shapes.items()} or (
        fingerprint(fast) != e.fingerprint or copies_fingerprint(saved) != e.saved_fingerprint
    ):
        raise AdapterFileError(
            f"reloaded adapter {e.name!r} does not match the content {e.content_hash} it was added with "
            "(the loader must return the tensors of that exact content hash, not the latest file)"
        )
    return fast, saved
