"""LoraLayer: the base of every LoRA wrapper (layers.py), holding named adapters around a frozen base layer.

It owns what all wrapper types share: adding/removing adapters (and the inits that need no layout), activation
and per-row routing, and (from LayerMerge, layer_merge.py) the explicit, reversible merge/unmerge. A subclass supplies its layout through a few hooks: `adapter_shapes`, `_create`,
`_lora`, `delta`, `_out_rows` / `_from_out_rows` and the DoRA pair `_init_dora` / `_add_dora`.

Forward runs the layer's plan (plans.py), chosen by `choose_plan` at the first call after a state change:
assigning `active`, `disabled` or `row_routing`, adding or removing an adapter and any change of `merged` mark
it stale. Per call only what nobody tells the layer is checked: the input's dtype, autocast, the base's
requires_grad and hooks, live dropout (plans.FusedPlan).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import torch
import torch.nn as nn

from . import functional as LF
from .config import is_residual_init
from .errors import ConfigError, MergeStateError, UnsupportedFeatureError
from .layer_merge import LayerMerge, MergeRecord
from .plans import AddPath, BasePlan, Plan, PlanInput, RoutedPlan, SumPlan, WatchedDict

InitMode = Union[bool, str]


class LoraLayer(LayerMerge, nn.Module):
    """Common state and logic of all LoRA wrappers; subclasses define how A/B are built and applied."""

    supports_dropout = True  # False where inputs are ids (embeddings): dropout on ids is meaningless
    # the state the plan depends on (see __init__): assigning one marks the plan stale; assign, never mutate
    active = PlanInput(lambda pairs: tuple((n, w) for n, w in pairs))
    disabled = PlanInput(bool)
    row_routing = PlanInput()

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
        self.disabled = False  # True: the bare base runs (inject.disable_adapters)
        # per-row routing (set by inject.route_rows): (adapter names, row -> index into names, -1 = base only)
        self.row_routing: Optional[tuple[list[str], torch.Tensor]] = None

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
        return self.shapes_for(self.base_layer, r)

    @classmethod
    def shapes_for(cls, base_layer: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """`adapter_shapes` of a wrapper of this class around `base_layer`, without building the wrapper
        (callers check `check_base` first)."""
        raise NotImplementedError

    @classmethod
    def check_base(cls, base_layer: nn.Module) -> None:
        """Refuse (UnsupportedModuleError) a base this class can not wrap; the constructor runs it too."""

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

    # -- subclass hooks --------------------------------------------------------------------------------
    def _stores(self) -> tuple[Any, Any]:
        return self.lora_A, self.lora_B

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
