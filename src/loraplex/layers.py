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
from typing import Any, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import functional as LF
from .config import is_residual_init
from .errors import ConfigError, MergeStateError, UnsupportedFeatureError, UnsupportedModuleError
from .functional import Conv1D
from .lora_layer import DoraMagnitude, InitMode, LoraLayer
from .plans import AddPath, FusedPlan, Plan, PlanInput, SumPlan


class LoraLinear(LoraLayer):
    """LoRA over nn.Linear (weight (out, in)) or GPT-2 Conv1D (weight (in, out): fan_in_fan_out by type)."""

    fused = PlanInput(bool)  # may one active plain adapter run with the base as one node (FusedPlan)?

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.layout = LF.weight_layout(base_layer)
        self.fan_in_fan_out = self.layout == "in_out"
        self.in_features, self.out_features = LF.linear_features(base_layer)
        # A plain base (not a subclass) computes exactly x @ W.T + b, so forward may run base + LoRA as one
        # autograd node (plans.FusedPlan); `fused = False` forces the generic path, its reference.
        self.fused = type(base_layer) is nn.Linear or (self.fan_in_fan_out and type(base_layer) is Conv1D)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def choose_plan(self) -> Plan:
        """LoraLayer's plan, or a FusedPlan over it where one active, unmerged adapter adds by "addmm"."""
        plan = super().choose_plan()
        if self.fused and isinstance(plan, SumPlan) and len(self.active) == 1 and plan.adapters[0][2] == "addmm":
            name, weight, _ = plan.adapters[0]
            return FusedPlan(name, weight, plan)
        return plan

    def _add_path(self, name: str) -> AddPath:
        return "addmm" if not self.is_dora(name) and self.lora_b_bias(name) is None else super()._add_path(name)

    @classmethod
    def shapes_for(cls, base_layer: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        fin, fout = LF.linear_features(base_layer)
        return (r, fin), (fout, r)

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

    def _addmm_lora(self, name: str, x: torch.Tensor, result: torch.Tensor, weight: float) -> torch.Tensor:
        """`_add_lora` for an adapter without LoRA-B bias, as one addmm (LF.lora_linear_add) when the base output
        is in the adapter's dtype, which only the input decides; else (e.g. a bf16 base under fp32 adapters) the
        generic cast-and-add."""
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        if result.dtype != a.dtype:
            return self._add_lora(name, x, result, weight)
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

    @classmethod
    def shapes_for(cls, base_layer: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (r, base_layer.num_embeddings), (base_layer.embedding_dim, r)

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
        self.check_base(base_layer)
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    @classmethod
    def check_base(cls, base_layer: nn.Module) -> None:
        if base_layer.groups != 1:
            raise UnsupportedModuleError(f"LoRA on grouped convolutions is not supported (groups={base_layer.groups})")
        if base_layer.padding_mode != "zeros":
            raise UnsupportedModuleError(f"LoRA needs padding_mode='zeros', got {base_layer.padding_mode!r}")

    @classmethod
    def shapes_for(cls, base_layer: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        k = base_layer.kernel_size
        return (r, base_layer.in_channels, *k), (base_layer.out_channels, r, *(1,) * len(k))

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
    return lora_layer_type(module)(module)


def lora_layer_type(module: nn.Module) -> type[LoraLayer]:
    """The LoRA wrapper class `lora_layer_for` builds around `module`, after its `check_base` passed
    (UnsupportedModuleError for a module no wrapper supports)."""
    from .quant.linear import QuantLinear  # lazy: loraplex.quant imports store -> inject -> this module

    cls: type[LoraLayer] | None = None
    if isinstance(module, QuantLinear):
        from .quant.lora import LoraQuantLinear

        cls = LoraQuantLinear
    elif isinstance(module, nn.Linear) or (Conv1D is not None and isinstance(module, Conv1D)):
        cls = LoraLinear
    elif isinstance(module, nn.Embedding):
        cls = LoraEmbedding
    elif isinstance(module, (nn.Conv1d, nn.Conv2d)):
        cls = LoraConv
    if cls is not None:
        cls.check_base(module)
        return cls
    raise UnsupportedModuleError(
        f"cannot put LoRA on a {type(module).__name__}; supported: nn.Linear, nn.Embedding, nn.Conv1d, "
        "nn.Conv2d, transformers Conv1D, loraplex QuantLinear"
    )
