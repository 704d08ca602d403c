"""LoraLayer: the base of every LoRA wrapper (layers.py), holding named adapters around a frozen base layer.

It owns what all wrapper types share: adding/removing adapters (and the inits that need no layout), activation
and per-row routing, and the explicit, reversible merge/unmerge (functional.exact_merge / exact_restore keep
the bit-exact restore). A subclass supplies its layout through a few hooks: `adapter_shapes`, `_create`,
`_lora`, `delta`, `_out_rows` / `_from_out_rows` and the DoRA pair `_init_dora` / `_add_dora`.

Forward runs the layer's plan (plans.py), chosen by `choose_plan` at the first call after a state change:
assigning `active`, `disabled` or `row_routing`, adding or removing an adapter and any change of `merged` mark
it stale. Nothing is decided per call but what depends on the input (FusedPlan says which facts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
import torch.nn as nn

from . import functional as LF
from .config import is_residual_init
from .errors import ConfigError, MergeStateError, NonFiniteError, UnsupportedFeatureError
from .plans import AddPath, BasePlan, Plan, RoutedPlan, SumPlan, WatchedDict

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
        self._plan: Optional[Plan] = None  # what forward runs; None: stale, chosen again at the next call
        self.active: tuple[tuple[str, float], ...] = ()  # (adapter name, mixing weight), applied on the fly
        self.merged: dict[str, MergeRecord] = WatchedDict(self._stale)  # in merge order; a change -> stale plan
        # residual-init adapters (PiSSA/OLoRA): name -> (A0 (r, in), B0 (out, r)), the initial factors whose
        # scaled product was subtracted from the base weight; the base holds W_res = W - scale * B0 @ A0
        self.residual: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.disabled = False
        # per-row routing (set by inject.route_rows): (adapter names, row -> index into names, -1 = base only)
        self.row_routing: Optional[tuple[list[str], torch.Tensor]] = None

    # -- state the plan depends on: assigning it marks the plan stale ----------------------------------------
    @property
    def active(self) -> tuple[tuple[str, float], ...]:
        """The (name, mixing weight) pairs applied on the fly, in order; assign a new sequence to change them."""
        return self._active

    @active.setter
    def active(self, pairs: Any) -> None:
        self._active = tuple((n, w) for n, w in pairs)
        self._stale()

    @property
    def disabled(self) -> bool:
        """True: forward runs the bare base (inject.disable_adapters)."""
        return self._disabled

    @disabled.setter
    def disabled(self, value: bool) -> None:
        self._disabled = bool(value)
        self._stale()

    @property
    def row_routing(self) -> Optional[tuple[list[str], torch.Tensor]]:
        """(adapter names, row -> index into names, -1 = base only) while inject.route_rows runs, else None."""
        return self._row_routing

    @row_routing.setter
    def row_routing(self, value: Optional[tuple[list[str], torch.Tensor]]) -> None:
        self._row_routing = value
        self._stale()

    def _stale(self) -> None:
        self._plan = None

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
        self._stale()
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
        self.active = [(n, w) for n, w in self.active if n != name]  # marks the plan stale

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
        return self.plan(self, x, *args, **kwargs)

    @property
    def plan(self) -> Plan:
        """The plan forward runs in the current state (chosen now if a change made it stale)."""
        return self._plan if self._plan is not None else self._replan()

    def _replan(self) -> Plan:
        self._plan = self.choose_plan()  # raises (and stays stale) where the state cannot run
        return self._plan

    def choose_plan(self) -> Plan:
        """The plan (plans.py) for the current state: the base alone when disabled or nothing unmerged is active,
        per-row routing, else the sum over the active unmerged adapters. Raises UnsupportedFeatureError for a
        DoRA adapter active beside others or at a weight other than 1 (at forward, as PEFT)."""
        if self.disabled:
            return BasePlan()
        if self.row_routing is not None:
            return RoutedPlan()
        pending = [(name, weight) for name, weight in self.active if name not in self.merged]  # merged: in the base
        for name, weight in pending:
            if self.is_dora(name):
                _check_dora_weight(name, weight, len(self.active))
        if not pending:
            return BasePlan()
        return SumPlan(tuple((name, weight, self._add_path(name)) for name, weight in pending))

    def _add_path(self, name: str) -> AddPath:
        """How adapter `name` adds its output (plans.AddPath); LoraLinear adds "addmm"."""
        return "dora" if self.is_dora(name) else "lora"

    def _add_lora(self, name: str, x: torch.Tensor, result: torch.Tensor, weight: float) -> torch.Tensor:
        """result + weight * lora_name(x), cast to result's dtype."""
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
        return f"adapters={self.r}, active={list(self.active)}, merged={list(self.merged)}"


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


def _tensor(p: Any) -> torch.Tensor:
    """The weight tensor of an A/B entry (a module with .weight, or a bare Parameter)."""
    return p.weight if isinstance(p, nn.Module) else p
