"""LoRA wrappers. Each wraps (never subclasses) a base layer and holds any number of named adapters.

Module layout mirrors PEFT so state-dict keys interoperate:
    <path>.base_layer            the original module (frozen)
    <path>.lora_A.<name>.weight  (r, in)            Linear / Conv1D / Conv: an nn.Linear or nn.ConvNd
    <path>.lora_B.<name>.weight  (out, r)
    <path>.lora_embedding_A.<name>  (r, num_embeddings)   Embedding: bare parameters
    <path>.lora_embedding_B.<name>  (embedding_dim, r)
    <path>.lora_magnitude_vector.<name>.weight  (out,)  DoRA only: the learned magnitude m (conv: (1, out, 1[, 1]))

Forward: y = base(x) + sum over active (name, w) not merged of  w * scale[name] * B[name](A[name](dropout(x))).
A DoRA adapter (one active, weight 1) instead gives y = g * (x @ W.T + scale * B(A(x))) + bias with
g = m / ||W + scale B A||_row (functional.py; PEFT's formula, dropout included).
Merging is explicit (`merge`/`unmerge`), never a side effect of train()/eval().
A residual init (PiSSA, OLoRA: LoraLinear only) rewrites the base weight to W - scale * B0 @ A0 when the adapter is
added, explicitly requested by its init; `residual` keeps (A0, B0) so the base can be restored (remove_adapter)
and the adapter saved as a plain LoRA on W (store.save_adapter). Such an adapter is alone on its layer.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import functional as LF
from .config import is_residual_init
from .functional import Conv1D
from .errors import ConfigError, MergeStateError, NonFiniteError, UnsupportedFeatureError, UnsupportedModuleError


InitMode = Union[bool, str]


@dataclass
class MergeRecord:
    """What `merge` did to a layer, enough for `unmerge` to undo it.

    weight: the factor the delta was merged with.  restore_error: max |W - unmerge(merge(W))| that a plain
    unmerge leaves (computed at merge time with the same arithmetic).  residual: kept when an exact restore was
    requested, else None: (flat indices, original values) of the elements a plain unmerge would get wrong.
    versions: the in-place version counters of the adapter's tensors, so a changed adapter cannot be unmerged.
    dora_scale: for a DoRA adapter, the g (out,) the merge scaled the rows by (computed from the unmerged base,
    so unmerge can invert it); None for plain LoRA.
    """

    weight: float
    restore_error: float
    residual: Optional[LF.Residual]
    versions: tuple[int, ...]
    dora_scale: Optional[torch.Tensor] = None
    bias_before: Optional[torch.Tensor] = None  # lora_bias: the base bias before scale * b was added to it


class LoraLayer(nn.Module):
    """Common state and logic of all LoRA wrappers; subclasses define how A/B are built and applied."""

    supports_dropout = True  # False where inputs are ids (embeddings): dropout on ids is meaningless

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.training = base_layer.training  # a wrapper joins the model in its mode (dropout off in eval)
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters only: name -> DoraMagnitude (weight (out,))
        self.active: list[tuple[str, float]] = []  # (adapter name, mixing weight), applied on the fly
        self.merged: dict[str, MergeRecord] = {}
        # residual-init adapters (PiSSA/OLoRA): name -> (A0 (r, in), B0 (out, r)), the initial factors whose
        # scaled product was subtracted from the base weight; the base holds W_res = W - scale * B0 @ A0
        self.residual: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.disabled = False
        # per-row routing (set by inject.route_rows): (adapter names, row -> index into names, -1 = base only)
        self.row_routing: Optional[tuple[list[str], torch.Tensor]] = None

    # -- adapters --------------------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        return list(self.r)

    def add_adapter(
        self, name: str, r: int, lora_alpha: float, *, dropout: float = 0.0, use_rslora: bool = False,
        init: Optional[InitMode] = True, generator: Optional[torch.Generator] = None, use_dora: bool = False,
        lora_bias: bool = False,
    ) -> None:
        """Create adapter `name` of rank r, initialized per `init` (True: A kaiming-uniform, B zero;
        "gaussian": A ~ N(0, 1/r), B zero; False: both random, so the adapter is not a no-op; None: left
        uninitialized for the caller to copy weights in; "orthogonal", "pissa", "pissa_niter_<N>", "olora": see
        LoraLinear._init; `check_new_adapter` says what is refused). `use_dora` adds the DoRA magnitude
        m = ||W + scale B A||_row (so a fresh adapter computes W + scale B A). `lora_bias` gives lora_B a bias
        (zero at the start; random with init False). Its modules take this wrapper's train/eval mode."""
        if name in self.r:
            raise ConfigError(f"adapter {name!r} already exists on this layer")
        self.check_new_adapter(init, r, lora_bias)
        self.r[name] = r
        self.lora_alpha[name] = lora_alpha
        self.scaling[name] = LF.scaling(r, lora_alpha, use_rslora)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 and self.supports_dropout else nn.Identity()
        self._create(name, r)
        if lora_bias:
            self._add_lora_bias(name)
        with torch.no_grad():
            if init is not None:
                tensors = self.adapter_params(name)  # A, B (and a LoRA-B bias); no DoRA magnitude yet
                if generator is None or tensors[0].device == generator.device:
                    self._init(name, init, generator)
                else:  # the seeded generator lives on another device (a CPU generator, a CUDA base): draw there
                    homes = [t.data for t in tensors]  # and copy, so a seed gives the same adapter on every device
                    for t in tensors:
                        t.data = torch.empty_like(t, device=generator.device)
                    self._init(name, init, generator)
                    for t, home in zip(tensors, homes):
                        home.copy_(t.data)
                        t.data = home
            if use_dora:  # created here; with init=None its value is the caller's to copy in
                self._init_dora(name)
        for child in self.children():
            if child is not self.base_layer:
                child.train(self.training)

    def remove_adapter(self, name: str) -> None:
        if name in self.merged:
            raise MergeStateError(f"adapter {name!r} is merged into {type(self.base_layer).__name__}; unmerge it first")
        if name in self.residual:  # put back the base weight its init rewrote: W = W_res + scale * B0 @ A0
            with torch.no_grad():
                self.set_base_weight(self.unmerged_base_weight())
            del self.residual[name]
        for store in self._stores():
            del store[name]
        for table in (self.r, self.lora_alpha, self.scaling):
            del table[name]
        del self.lora_dropout[name]
        if name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]
        self.active = [(n, w) for n, w in self.active if n != name]

    def check_new_adapter(self, init: Optional[InitMode], r: int, lora_bias: bool = False) -> None:
        """Raise what `add_adapter(..., r, init=init)` refuses, changing nothing: an init this layer type does not
        implement, and any second adapter beside a residual-init one (it rewrote the base the other would see)."""
        if self.residual:
            raise UnsupportedFeatureError(
                f"adapter {next(iter(self.residual))!r} was initialized with a residual init (PiSSA/OLoRA) and "
                f"rewrote the base weight of this {type(self.base_layer).__name__}; another adapter here would sit on "
                "that residual, not on the base: remove it first, or save it (a plain LoRA) and load the file")
        if is_residual_init(init) and self.r:
            raise UnsupportedFeatureError(
                f"init_lora_weights={init!r} rewrites the base weight of this {type(self.base_layer).__name__}, on "
                f"which adapters {list(self.r)} already sit: start it on a model without adapters on these modules")
        if init not in (None, True, False, "gaussian"):
            self._check_init(init, r)
        if lora_bias and not self._takes_lora_bias():
            raise UnsupportedFeatureError(f"lora_bias is implemented for float Linear and GPT-2 Conv1D layers only, "
                                          f"not {type(self.base_layer).__name__}: exclude this module or drop lora_bias")

    def _takes_lora_bias(self) -> bool:
        return False

    def lora_b_bias(self, name: str) -> Optional[torch.Tensor]:
        """PEFT's LoRA-B bias b (out,) of adapter `name` (lora_bias), or None."""
        return None

    def _check_init(self, init: InitMode, r: int) -> None:
        """Refuse an init beyond True/False/"gaussian" this layer type does not implement (LoraLinear does more)."""
        raise UnsupportedFeatureError(
            f"init_lora_weights={init!r} is implemented for Linear and GPT-2 Conv1D layers only, not for "
            f"{type(self.base_layer).__name__}; use True, False or 'gaussian' here (e.g. exclude this module)")

    def adapter_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes (A, B) of a rank-r adapter on this layer, as `_create` makes them (nothing allocated)."""
        raise NotImplementedError

    def adapter_tensors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of adapter `name` as stored (PEFT layout)."""
        a, b = self._stores()
        return _tensor(a[name]), _tensor(b[name])

    def adapter_params(self, name: str) -> tuple[torch.Tensor, ...]:
        """Every tensor of adapter `name` that trains: (A, B), plus the DoRA magnitude m (out,) or the LoRA-B bias
        b (out,) if it has one."""
        m = self.lora_magnitude_vector[name].weight if name in self.lora_magnitude_vector else None
        b = self.lora_b_bias(name)  # never with DoRA (LoraConfig refuses the pair)
        return self.adapter_tensors(name) + (() if m is None else (m,)) + (() if b is None else (b,))

    def is_dora(self, name: str) -> bool:
        return name in self.lora_magnitude_vector

    # -- forward ---------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        if self.row_routing is not None:
            return self._routed(x, result)
        for name, weight in self.active:
            if name in self.merged:
                continue  # already inside the base weight
            if self.is_dora(name):
                _check_dora_weight(name, weight, len(self.active))
                result = self._add_dora(name, x, result)
            else:
                result = self._add_lora(name, self.lora_dropout[name](x), result, weight)
        return result

    def _add_lora(self, name: str, x: torch.Tensor, result: torch.Tensor, weight: float) -> torch.Tensor:
        """result + weight * lora_name(x); subclasses may fuse the sum (LoraLinear does)."""
        delta = self._lora(name, x)
        return result + (delta if weight == 1.0 else weight * delta).to(result.dtype)

    def _routed(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """result[b] += lora_{names[idx[b]]}(x[b]) for rows with idx[b] >= 0 (one segment per adapter; autograd-safe).
        The training path for several adapters in one batch, and the slow reference for the runtime."""
        names, idx = self.row_routing
        for slot, name in enumerate(names):
            if name not in self.r:
                continue
            rows = (idx == slot).nonzero().squeeze(1)  # (n_rows,)
            if rows.numel() and self.is_dora(name):  # rescales its rows' whole output: replace them
                rescaled = self._add_dora(name, x.index_select(0, rows), result.index_select(0, rows))
                result = result.index_copy(0, rows, rescaled.to(result.dtype))
            elif rows.numel():
                d = self._lora(name, self.lora_dropout[name](x.index_select(0, rows)))
                result = result.index_add(0, rows, d.to(result.dtype))
        return result

    # -- merge -----------------------------------------------------------------------------------------
    def delta(self, name: str) -> torch.Tensor:
        """scale * B @ A in the layout of the base weight (fp32 or wider)."""
        raise NotImplementedError

    def get_base_weight(self) -> torch.Tensor:
        """The base weight that merges write into (float layers: the weight tensor itself)."""
        return self.base_layer.weight.data

    def set_base_weight(self, weight: torch.Tensor) -> None:
        self.base_layer.weight.data.copy_(weight)

    def unmerged_base_weight(self) -> torch.Tensor:
        """The base weight without the merged adapters, and with what a residual init subtracted added back (up to
        rounding): the weight itself when neither applies."""
        w = self.get_base_weight()
        for name, rec in self.merged.items():
            if rec.dora_scale is not None:  # the only merged adapter on this layer (merge refuses others)
                w = self._merge_maps(name, rec.weight, w, w.dtype, rec.dora_scale)[1](w)
                break
            w = w - rec.weight * self.delta(name).to(w.dtype)
        for name, (a0, b0) in self.residual.items():  # the base holds W_res = W - scale * B0 @ A0
            d0 = LF.delta_weight(a0, b0, self.scaling[name])  # (out, in)
            w = w + self._from_out_rows(d0, w.shape).to(w.dtype)
        return w

    def _merge_maps(self, name: str, weight: float, w: torch.Tensor, compute: torch.dtype,
                    g: Optional[torch.Tensor] = None) -> tuple[Callable, Callable, Optional[torch.Tensor]]:
        """(W -> merged W, merged W -> W, g) in `compute`, W in the base's storage layout. Plain LoRA adds /
        subtracts weight * delta; DoRA (weight 1) gives g * (W + delta) row-wise and back, with g = m / ||W +
        delta||_row computed from `w` (the unmerged base) unless given."""
        d = weight * self.delta(name).to(compute)
        if not self.is_dora(name):
            return (lambda t: t + d), (lambda t: t - d), None
        rows, back = self._out_rows, (lambda t: self._from_out_rows(t, w.shape))
        if g is None:
            a, b, m = self.adapter_params(name)
            g = LF.dora_scale(m.to(compute), rows(w.to(compute)), a.to(compute), b.to(compute), self.scaling[name])
        d_rows = rows(d)
        return (lambda t: back(LF.dora_merged_weight(rows(t), d_rows, g)),
                lambda t: back(LF.dora_unmerged_weight(rows(t), d_rows, g)), g)

    def _out_rows(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor in the base weight's storage layout as (out, in * prod(k)) rows (DoRA's norm runs per row)."""
        return t

    def _from_out_rows(self, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Inverse of `_out_rows` for a weight of storage shape `shape`."""
        return t

    @torch.no_grad()
    def merge(self, name: str, weight: float = 1.0, *, safe: bool = True, exact: bool = False) -> MergeRecord:
        """W <- W + weight * delta(name). `safe` refuses a result with NaN/Inf (nothing is written);
        `exact` keeps the tiny residual that makes `unmerge` restore W bit for bit."""
        if name not in self.r:
            raise MergeStateError(f"no adapter {name!r} on this layer; have {self.adapter_names}")
        if name in self.merged:
            raise MergeStateError(f"adapter {name!r} is already merged")
        self.check_merge(name, weight)
        w = self.get_base_weight()
        compute = torch.promote_types(w.dtype, torch.float32)
        forward, back, g = self._merge_maps(name, weight, w, compute)
        merged, restored, kept = LF.exact_merge(w, forward, back)
        if safe and not torch.isfinite(merged).all():
            raise NonFiniteError(f"merging adapter {name!r} would write NaN/Inf into the base weight; nothing changed")
        diff = w.to(compute) - restored.to(compute)
        err = float(diff.abs().max()) if diff.numel() else 0.0
        residual = kept if exact and err > 0 else None
        self.set_base_weight(merged)
        bias_before = self._merge_lora_bias(name, weight)
        record = MergeRecord(weight=weight, restore_error=err, residual=residual, versions=self._versions(name),
                             dora_scale=g, bias_before=bias_before)
        self.merged[name] = record
        return record

    def check_merge(self, name: str, weight: float) -> None:
        """Raise what `merge(name, weight)` would refuse for DoRA, changing nothing: DoRA rescales whole rows of
        W, so it merges only at weight 1 into a layer holding no other merge, and nothing merges on top of it
        (the row scale g is defined from the bare base weight)."""
        if self.lora_b_bias(name) is not None and getattr(self.base_layer, "bias", None) is None:
            raise UnsupportedFeatureError(f"adapter {name!r} has a LoRA-B bias (lora_bias) but this "
                                          f"{type(self.base_layer).__name__} has no bias to merge it into (as in "
                                          "PEFT); keep it on the fly")
        if self.is_dora(name) and weight != 1.0:
            raise UnsupportedFeatureError(f"DoRA adapter {name!r} merges only with weight 1.0, got {weight}: a "
                                          "scaled DoRA update is not defined (merge it at weight 1)")
        if self.is_dora(name) and self.merged:
            raise MergeStateError(f"cannot merge DoRA adapter {name!r}: {list(self.merged)} already merged into this "
                                  "layer, and DoRA's row scale is defined from the bare base; unmerge them first")
        dora = [n for n, rec in self.merged.items() if rec.dora_scale is not None]
        if dora:
            raise MergeStateError(f"cannot merge {name!r}: DoRA adapter {dora[0]!r} is merged into this layer and "
                                  "rescaled its rows; unmerge it first")

    @torch.no_grad()
    def unmerge(self, name: str) -> MergeRecord:
        """Undo `merge(name)`: W <- W - weight * delta(name) (+ residual if the merge kept one)."""
        record = self.merged.get(name)
        if record is None:
            raise MergeStateError(f"adapter {name!r} is not merged; merged: {list(self.merged)}")
        if record.versions != self._versions(name):
            raise MergeStateError(f"adapter {name!r} changed since it was merged; unmerge would not restore the base")
        w = self.get_base_weight()
        compute = torch.promote_types(w.dtype, torch.float32)
        back = self._merge_maps(name, record.weight, w, compute, record.dora_scale)[1]
        self.set_base_weight(LF.exact_restore(w, back, record.residual))
        biased = [n for n, rec in self.merged.items() if rec.bias_before is not None]  # in merge order
        del self.merged[name]
        if record.bias_before is not None:  # the first LoRA-B bias merge holds the bare base bias, bit for bit
            bias = self.base_layer.bias.data
            if len(biased) == 1:
                bias.copy_(record.bias_before)
            else:
                bias.sub_((record.weight * self.scaling[name] * self.lora_b_bias(name).detach()).to(bias.dtype))
                if biased[0] == name:  # hand the bare base bias on to the next one
                    self.merged[biased[1]].bias_before = record.bias_before
        return record

    def _merge_lora_bias(self, name: str, weight: float) -> Optional[torch.Tensor]:
        """Add weight * scale * b (lora_bias) to the base bias; returns the bias before, or None (no LoRA-B bias)."""
        b = self.lora_b_bias(name)
        if b is None:
            return None
        bias = self.base_layer.bias.data
        before = bias.clone()
        bias.add_((weight * self.scaling[name] * b.detach()).to(bias.dtype))
        return before

    # -- subclass hooks --------------------------------------------------------------------------------
    def _stores(self) -> tuple[Any, Any]:
        return self.lora_A, self.lora_B

    def _versions(self, name: str) -> tuple[int, ...]:
        return tuple(t._version for t in self.adapter_params(name))

    def _create(self, name: str, r: int) -> None:
        raise NotImplementedError

    def _add_lora_bias(self, name: str) -> None:
        """Give adapter `name`'s lora_B a zero bias (out,); only layers whose `_takes_lora_bias` is True."""
        raise NotImplementedError

    def _init(self, name: str, init: InitMode, generator: Optional[torch.Generator]) -> None:
        a, b = self.adapter_tensors(name)
        if init is True:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
            nn.init.zeros_(b)
        elif init == "gaussian":
            nn.init.normal_(a, std=1.0 / self.r[name], generator=generator)
            nn.init.zeros_(b)
        elif init is False:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
            nn.init.kaiming_uniform_(b, a=math.sqrt(5), generator=generator)
            if self.lora_b_bias(name) is not None:  # nn.Linear's default bias init, as PEFT leaves it
                bound = 1 / math.sqrt(self.r[name])
                nn.init.uniform_(self.lora_b_bias(name), -bound, bound, generator=generator)
        else:
            raise ConfigError(f"init_lora_weights must be True, False or 'gaussian', got {init!r}")

    def _lora(self, name: str, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _init_dora(self, name: str) -> None:
        """Create the DoRA magnitude m = ||W + scale B A||_row of adapter `name` (so that g = 1)."""
        raise NotImplementedError

    def _add_dora(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """The base output `result` with DoRA adapter `name` applied (PEFT's formula for this layer type)."""
        raise NotImplementedError

    def _lora_dtype(self) -> torch.dtype:
        """Adapters train in fp32 even over a bf16/fp16 base (PEFT's default autocast)."""
        w = self.get_base_weight()
        return torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype

    def extra_repr(self) -> str:
        return f"adapters={self.r}, active={self.active}, merged={list(self.merged)}"


class DoraMagnitude(nn.Module):
    """Holds one DoRA adapter's magnitude m as `.weight` (out,), PEFT's in-memory key layout."""

    def __init__(self, magnitude: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(magnitude)


def _check_dora_weight(name: str, weight: float, n_active: int) -> None:
    if weight != 1.0 or n_active != 1:
        raise UnsupportedFeatureError(
            f"DoRA adapter {name!r} runs only alone at weight 1.0 (got weight {weight} among {n_active} active "
            "adapters): DoRA rescales the whole output row, so a weighted mix with it is not defined"
        )


class LoraLinear(LoraLayer):
    """LoRA over nn.Linear (weight (out, in)) or GPT-2 Conv1D (weight (in, out): fan_in_fan_out by type)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.layout = LF.weight_layout(base_layer)
        self.fan_in_fan_out = self.layout == "in_out"
        self.in_features, self.out_features = LF.linear_features(base_layer)
        # A plain base (not a subclass) computes exactly x @ W.T + b, so forward may run base + LoRA as one
        # autograd node (LF.linear_with_lora); `fused = False` forces the generic path, its reference.
        self.fused = type(base_layer) is nn.Linear or (self.fan_in_fan_out and type(base_layer) is Conv1D)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        single = None if args or kwargs else self._single_adapter(x)
        if single is None:
            return super().forward(x, *args, **kwargs)
        name, scale = single
        base = self.base_layer
        weight = LF.out_in(base.weight, self.layout)  # (out, in)
        return LF.linear_with_lora(x, weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight, scale)

    def _single_adapter(self, x: torch.Tensor) -> Optional[tuple[str, float]]:
        """(name, weight * scaling) when base + LoRA can run as one node (LF.linear_with_lora): one active,
        unmerged adapter without live dropout, over a plain, frozen, unhooked base in the adapter's dtype, outside
        autocast (which would cast the node's GEMMs one by one); else None."""
        if (self.disabled or self.row_routing is not None or len(self.active) != 1 or not self.fused
                or torch.is_autocast_enabled(x.device.type)):
            return None
        name, weight = self.active[0]
        if self.is_dora(name) or self.lora_b_bias(name) is not None:
            return None
        base = self.base_layer
        a = self.lora_A[name].weight
        dropout = self.lora_dropout[name]
        if (name in self.merged or (dropout.training and not isinstance(dropout, nn.Identity))
                or x.dtype != a.dtype or base.weight.dtype != a.dtype or base.weight.requires_grad
                or (base.bias is not None and base.bias.requires_grad)
                or base._forward_hooks or base._forward_pre_hooks):
            return None
        return name, weight * self.scaling[name]

    def adapter_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (r, self.in_features), (self.out_features, r)

    def _check_init(self, init: InitMode, r: int) -> None:
        if init == "orthogonal":
            if r % 2:
                raise ConfigError(f"init_lora_weights='orthogonal' needs an even rank (A and B take half of an "
                                  f"orthogonal basis each), got r={r}")
            return
        if not is_residual_init(init):
            super()._check_init(init, r)
        if type(self.base_layer) is not nn.Linear and not self.fan_in_fan_out:
            raise UnsupportedFeatureError(
                f"init_lora_weights={init!r} rewrites the base weight, which loraplex does only for float nn.Linear "
                f"and Conv1D layers, not {type(self.base_layer).__name__}: quantize after saving, or use another init")
        if not self.get_base_weight().is_floating_point():
            raise UnsupportedFeatureError(f"init_lora_weights={init!r} needs a float base weight, got "
                                          f"{self.get_base_weight().dtype}")
        if r > min(self.in_features, self.out_features):
            raise ConfigError(f"init_lora_weights={init!r}: r={r} exceeds min(in, out) = "
                              f"{min(self.in_features, self.out_features)}, the most singular/QR directions the base "
                              "weight has: pass a smaller rank")

    def _init(self, name: str, init: InitMode, generator: Optional[torch.Generator]) -> None:
        """Beyond the common inits (LoraLayer._init), PEFT's "orthogonal" (LF.orthogonal_factors) and the residual
        ones, "pissa", "pissa_niter_<N>", "olora" (LF.residual_factors of the base weight W (out, in)): those then
        rewrite the base weight to W - scale * B @ A (in its dtype) and keep (A, B) in `residual`, so the layer's
        output is unchanged at the start up to that rounding."""
        a, b = self.adapter_tensors(name)
        if init == "orthogonal":
            a0, b0 = LF.orthogonal_factors(self.in_features, self.out_features, self.r[name], generator)
            a.copy_(a0)
            b.copy_(b0)
            return
        if not is_residual_init(init):
            return super()._init(name, init, generator)
        w = self._weight_out_in()  # (out, in)
        a0, b0 = LF.residual_factors(w, self.r[name], self.scaling[name], init, generator)
        a0, b0 = a0.to(a.dtype), b0.to(b.dtype)  # what the adapter holds, kept on the base's device
        a.copy_(a0)
        b.copy_(b0)
        w_res = w.float() - self.scaling[name] * (b0.float() @ a0.float())  # (out, in)
        self.set_base_weight(self._from_out_rows(w_res.to(w.dtype), self.get_base_weight().shape))
        self.residual[name] = (a0, b0)

    def _create(self, name: str, r: int) -> None:
        kw = dict(bias=False, device=self.get_base_weight().device, dtype=self._lora_dtype())
        self.lora_A[name] = nn.Linear(self.in_features, r, **kw)
        self.lora_B[name] = nn.Linear(r, self.out_features, **kw)

    def _lora(self, name: str, x: torch.Tensor) -> torch.Tensor:
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        return LF.lora_linear(x.to(a.dtype), a, b, self.scaling[name], self.lora_b_bias(name))

    def _takes_lora_bias(self) -> bool:
        return isinstance(self.base_layer, nn.Linear) or self.fan_in_fan_out

    def lora_b_bias(self, name: str) -> Optional[torch.Tensor]:
        return self.lora_B[name].bias

    def _add_lora_bias(self, name: str) -> None:
        b = self.lora_B[name]
        b.bias = nn.Parameter(torch.zeros(self.out_features, device=b.weight.device, dtype=b.weight.dtype))

    def _out_rows(self, t: torch.Tensor) -> torch.Tensor:
        return LF.out_in(t, self.layout)

    def _from_out_rows(self, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return LF.out_in(t, self.layout)

    def _weight_out_in(self) -> torch.Tensor:
        """The base weight as (out, in) (Conv1D stores it transposed; a quantized base is dequantized)."""
        return self._out_rows(self.get_base_weight())

    def _init_dora(self, name: str) -> None:
        a, b = self.adapter_tensors(name)
        norm = LF.dora_weight_norm(self._weight_out_in().to(a.dtype), LF.delta_weight(a, b, self.scaling[name]))
        self.lora_magnitude_vector[name] = DoraMagnitude(norm.to(a.dtype))  # (out,): g = 1 at init

    def _add_dora(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """PEFT's DoRA forward: result + (g - 1) * x' @ W.T + g * scale * B(A(x')), x' = dropout(x) in training
        (then W x' is recomputed), else x' = x and x @ W.T = result - bias. In the adapter's dtype."""
        a, b, m = self.adapter_params(name)
        weight = self._weight_out_in().to(a.dtype)  # (out, in)
        g = LF.dora_scale(m, weight, a, b, self.scaling[name])  # (out,)
        xa, drop = x.to(a.dtype), self.lora_dropout[name]
        if isinstance(drop, nn.Identity) or not self.training:
            bias = getattr(self.base_layer, "bias", None)
            base_out = result if bias is None else result - bias
        else:
            xa = drop(xa)
            base_out = F.linear(xa, weight)
        lora_out = LF.lora_linear(xa, a, b, self.scaling[name])  # (..., out)
        return LF.dora_add(result, base_out, lora_out, g).to(result.dtype)

    def _add_lora(self, name: str, x: torch.Tensor, result: torch.Tensor, weight: float) -> torch.Tensor:
        """The fused path (one addmm, see LF.lora_linear_add) when the base output is in the adapter's dtype;
        otherwise (e.g. a bf16 base under fp32 adapters) the generic cast-and-add."""
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        if result.dtype != a.dtype or self.lora_b_bias(name) is not None:
            return super()._add_lora(name, x, result, weight)
        return LF.lora_linear_add(result, x.to(a.dtype), a, b, weight * self.scaling[name])

    def delta(self, name: str) -> torch.Tensor:
        return LF.out_in(LF.delta_weight(*self.adapter_tensors(name), self.scaling[name]), self.layout)


class LoraEmbedding(LoraLayer):
    """LoRA over nn.Embedding: y = E[ids] + scale * A.T[ids] @ B.T (no dropout on ids, as in PEFT)."""

    supports_dropout = False

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def _stores(self) -> tuple[Any, Any]:
        return self.lora_embedding_A, self.lora_embedding_B

    def adapter_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (r, self.base_layer.num_embeddings), (self.base_layer.embedding_dim, r)

    def _create(self, name: str, r: int) -> None:
        base = self.base_layer
        kw = dict(device=self.get_base_weight().device, dtype=self._lora_dtype())
        self.lora_embedding_A[name] = nn.Parameter(torch.empty(r, base.num_embeddings, **kw))
        self.lora_embedding_B[name] = nn.Parameter(torch.empty(base.embedding_dim, r, **kw))

    def _init(self, name: str, init: InitMode, generator: Optional[torch.Generator]) -> None:
        # Embedding roles are swapped (PEFT): A starts at zero, B random, so the adapter starts as a no-op.
        a, b = self.adapter_tensors(name)
        if init is False:
            nn.init.normal_(a, generator=generator)
            nn.init.normal_(b, generator=generator)
            return
        if init not in (True, "gaussian"):
            raise ConfigError(f"init_lora_weights must be True, False or 'gaussian', got {init!r}")
        nn.init.zeros_(a)
        nn.init.normal_(b, std=1.0 if init is True else 1.0 / self.r[name], generator=generator)

    def _lora(self, name: str, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        a, b = self.adapter_tensors(name)
        return LF.lora_embedding(
            x, a, b, self.scaling[name], padding_idx=base.padding_idx, max_norm=base.max_norm,
            norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse,
        )

    def delta(self, name: str) -> torch.Tensor:
        return LF.delta_weight(*self.adapter_tensors(name), self.scaling[name]).T  # (num_embeddings, dim)

    # DoRA (PEFT): the norm runs per embedding dimension, over the vocabulary, i.e. over the rows of E.T
    def _out_rows(self, t: torch.Tensor) -> torch.Tensor:
        return t.T  # (num_embeddings, dim) -> (dim, num_embeddings)

    def _from_out_rows(self, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return t.T

    def _init_dora(self, name: str) -> None:
        a, b = self.adapter_tensors(name)
        w = self._out_rows(self.get_base_weight()).to(a.dtype)  # (dim, num_embeddings)
        norm = LF.dora_weight_norm(w, LF.delta_weight(a, b, self.scaling[name]))  # (dim,)
        self.lora_magnitude_vector[name] = DoraMagnitude(norm.to(a.dtype))

    def _add_dora(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """g * (E[ids] + scale * A.T[ids] @ B.T): an embedding has no bias and no dropout (PEFT)."""
        a, b, m = self.adapter_params(name)
        g = LF.dora_scale(m, self._out_rows(self.get_base_weight()), a, b, self.scaling[name])  # (dim,)
        return LF.dora_add(result, result, self._lora(name, x), g).to(result.dtype)


class LoraConv(LoraLayer):
    """LoRA over nn.Conv1d/nn.Conv2d: A is a conv with the base's kernel/stride/padding/dilation into r
    channels, B a 1x1 conv back to out channels; merged kernel = scale * B·A. DoRA: one magnitude per output
    channel, stored (1, out, 1[, 1]) as PEFT does."""

    def __init__(self, base_layer: Union[nn.Conv1d, nn.Conv2d]) -> None:
        super().__init__(base_layer)
        if base_layer.groups != 1:
            raise UnsupportedModuleError(f"LoRA on grouped convolutions is not supported (groups={base_layer.groups})")
        if base_layer.padding_mode != "zeros":
            raise UnsupportedModuleError(f"LoRA needs padding_mode='zeros', got {base_layer.padding_mode!r}")
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def adapter_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        base = self.base_layer
        return (r, base.in_channels, *base.kernel_size), (base.out_channels, r, *(1,) * len(base.kernel_size))

    def _create(self, name: str, r: int) -> None:
        base = self.base_layer
        conv = type(base)
        kw = dict(bias=False, device=self.get_base_weight().device, dtype=self._lora_dtype())
        self.lora_A[name] = conv(base.in_channels, r, base.kernel_size, base.stride, base.padding, base.dilation, **kw)
        self.lora_B[name] = conv(r, base.out_channels, 1, 1, **kw)

    def _lora(self, name: str, x: torch.Tensor) -> torch.Tensor:
        a, b = self.lora_A[name], self.lora_B[name]
        return b(a(x.to(a.weight.dtype))) * self.scaling[name]

    def delta(self, name: str) -> torch.Tensor:
        return LF.conv_delta_weight(*self.adapter_tensors(name), self.scaling[name])

    def _out_rows(self, t: torch.Tensor) -> torch.Tensor:
        return t.flatten(1)  # (out, in, *k) -> (out, in * prod(k))

    def _from_out_rows(self, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return t.reshape(shape)

    def _init_dora(self, name: str) -> None:
        a, b = self.adapter_tensors(name)
        w = self._out_rows(self.get_base_weight()).to(a.dtype)
        norm = LF.dora_weight_norm(w, self._out_rows(LF.conv_delta_weight(a, b, self.scaling[name])))  # (out,)
        spatial = (1,) * (self.get_base_weight().dim() - 2)
        self.lora_magnitude_vector[name] = DoraMagnitude(norm.view(1, -1, *spatial).to(a.dtype))  # PEFT's shape

    def _add_dora(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """PEFT's conv DoRA forward (as LoraLinear's, with g broadcast over the spatial dimensions)."""
        a, b, m = self.adapter_params(name)
        base = self.base_layer
        weight = base.weight.to(a.dtype)  # (out, in, *k)
        spatial = (1,) * (weight.dim() - 2)
        g = LF.dora_scale(m, weight, a, b, self.scaling[name]).view(-1, *spatial)  # (out, 1[, 1])
        xa, drop = x.to(a.dtype), self.lora_dropout[name]
        if isinstance(drop, nn.Identity) or not self.training:
            base_out = result if base.bias is None else result - base.bias.view(-1, *spatial)
        else:
            xa = drop(xa)
            conv = F.conv1d if weight.dim() == 3 else F.conv2d
            base_out = conv(xa, weight, None, base.stride, base.padding, base.dilation, base.groups)
        return LF.dora_add(result, base_out, self._lora(name, xa), g).to(result.dtype)


class ModulesToSave(nn.Module):
    """A fully trainable copy of a module per adapter (PEFT's modules_to_save), e.g. a new classifier head.

    Keys: <path>.original_module.* (frozen) and <path>.modules_to_save.<name>.*; the copy of the active
    adapter is used, the original otherwise.
    """

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.training = original_module.training  # joins the model in its mode, like LoraLayer
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_name: Optional[str] = None
        self.merged_name: Optional[str] = None  # set by merge: this copy stands in for the original until unmerge
        self.disabled = False

    def add_adapter(self, name: str) -> None:
        clone = copy.deepcopy(self.original_module)
        for p in clone.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = clone
        self.modules_to_save.train(self.training)

    def remove_adapter(self, name: str) -> None:
        if self.merged_name == name:
            raise MergeStateError(f"adapter {name!r} is merged; unmerge it first")
        del self.modules_to_save[name]
        if self.active_name == name:
            self.active_name = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        name = self.merged_name or (None if self.disabled else self.active_name)
        module = self.original_module if name is None else self.modules_to_save[name]
        return module(*args, **kwargs)


def lora_layer_for(module: nn.Module) -> LoraLayer:
    """Build the LoRA wrapper matching `module`'s type (chosen once here, never by branching in forward)."""
    from .quant.linear import QuantLinear  # lazy: loraplex.quant imports store -> inject -> this module

    if isinstance(module, QuantLinear):
        from .quant.lora import LoraQuantLinear

        return LoraQuantLinear(module)
    if isinstance(module, nn.Linear) or (Conv1D is not None and isinstance(module, Conv1D)):
        return LoraLinear(module)
    if isinstance(module, nn.Embedding):
        return LoraEmbedding(module)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return LoraConv(module)
    raise UnsupportedModuleError(
        f"cannot put LoRA on a {type(module).__name__}; supported: nn.Linear, nn.Embedding, nn.Conv1d, "
        "nn.Conv2d, transformers Conv1D, loraplex QuantLinear"
    )


def _tensor(p: Any) -> torch.Tensor:
    """The weight tensor of an A/B entry (a module with .weight, or a bare Parameter)."""
    return p.weight if isinstance(p, nn.Module) else p
