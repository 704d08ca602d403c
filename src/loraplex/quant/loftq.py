"""LoftQ (PEFT's init_lora_weights="loftq"): quantize a base so that the quantized weight plus the new adapter's
start approximates the full-precision weight, instead of starting the adapter at zero over the rounding error.

For a targeted weight W (out, in), rank r, LoRA scale s and T iterations (PEFT's loftq_init, alternating):
    R_0 = W
    for t = 1..T:   Q_t = deQ(quant(R_{t-1}))                       # loraplex's own int8 / NF4 (quant/)
                    A_t, B_t = rank-r SVD of W - Q_t, split as  A = sqrt(S_r / s) Vh_r,  B = U_r sqrt(S_r / s)
                    R_t = W - s * B_t @ A_t
    base <- quant(R_{T-1}),  lora_A <- A_T (r, in),  lora_B <- B_T (out, r)
so s * B_T @ A_T is the best rank-r approximation of W - Q_T and ||W - (Q_T + s B_T A_T)|| <= ||W - Q_T||.
The quantizer is loraplex's (quantize_nf4 with the model's block size / double quant, or quantize_int8 per row),
so the base is a loraplex QuantLinear: loftq_bits 4 -> "nf4", 8 -> "int8". PEFT 0.21.2 runs the same loop with
bitsandbytes (CUDA only) and splits the factors without the scale (B A ~ W - Q), so the two agree when s = 1
(lora_alpha = r); loraplex keeps s so Q + s B A fits W for every alpha.

The adapter is a plain LoRA relative to the LoftQ-quantized base, not to the original weights: keep that base
(save_quantized) and load the adapter on it (load_quantized, then load_adapter). For PEFT, give it a float model
holding the dequantized weights (QuantLinear.dequantize()) and load the adapter there (init_lora_weights=true).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from ..config import LoraConfig
from ..errors import ConfigError, UnsupportedFeatureError
from ..functional import residual_factors, scaling
from ..inject import find_targets, inject, lora_layers
from ..layers import LoraLayer
from .linear import QuantizedWeight, QuantLinear, QuantSpec, linear_weight

BITS_TO_SCHEME = {4: "nf4", 8: "int8"}


@dataclass(frozen=True)
class LoftQConfig:
    """PEFT's LoftQConfig: loftq_bits (4: NF4, 8: int8) and loftq_iter (alternations, >= 1)."""

    loftq_bits: int = 4
    loftq_iter: int = 1

    def __post_init__(self) -> None:
        if self.loftq_bits not in BITS_TO_SCHEME or isinstance(self.loftq_bits, bool):
            raise ConfigError(f"LoftQConfig.loftq_bits: expected 4 (nf4) or 8 (int8), got {self.loftq_bits!r}")
        if isinstance(self.loftq_iter, bool) or not isinstance(self.loftq_iter, int) or self.loftq_iter < 1:
            raise ConfigError(f"LoftQConfig.loftq_iter: expected an int >= 1, got {self.loftq_iter!r}")

    @property
    def scheme(self) -> str:
        return BITS_TO_SCHEME[self.loftq_bits]


@torch.no_grad()
def loftq_factors(weight: torch.Tensor, r: int, scale: float, spec: QuantSpec, num_iter: int = 1
                  ) -> tuple[QuantizedWeight, torch.Tensor, torch.Tensor]:
    """(quantized base, A (r, in), B (out, r)) of LoftQ for W (out, in), in fp32 (see the module docstring)."""
    if r > min(weight.shape):
        raise ConfigError(f"LoftQ: r={r} exceeds min(out, in) = {min(weight.shape)} of a targeted weight; pass a "
                          "smaller rank")
    w = weight.detach().float()  # (out, in)
    target = w
    for t in range(num_iter):
        q = spec.quantize(target)
        a, b = residual_factors(w - q.dequantize(torch.float32), r, scale, "pissa")  # (r, in), (out, r)
        if t + 1 < num_iter:
            target = w - scale * (b @ a)
    return q, a, b


@torch.no_grad()
def loftq_quantize(model: nn.Module, config: LoraConfig, loftq_config: Optional[LoftQConfig] = None, *,
                   block_size: int = 64, double_quant: bool = False, compute_dtype: torch.dtype = torch.float32
                   ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Replace, in place, every module `config` targets (float nn.Linear / GPT-2 Conv1D without adapters) by a
    QuantLinear holding its LoftQ quantization; returns {module: (A (r, in), B (out, r))}, the adapter start that
    goes with it (`set_loftq_factors`). Other layers are left as they are (quantize_model skips QuantLinear).
    block_size / double_quant apply to nf4. Nothing is replaced unless every target can be."""
    loftq = loftq_config or LoftQConfig()
    spec = QuantSpec(loftq.scheme, block_size, double_quant, compute_dtype)
    modules = dict(model.named_modules())
    targets = find_targets(model, config)
    for key in targets:
        m = modules[key]
        if isinstance(m, LoraLayer) or not isinstance(m, (nn.Linear, Conv1D)) or not m.weight.is_floating_point():
            raise UnsupportedFeatureError(
                f"LoftQ rewrites the float weight of each target, but {key!r} is a {type(m).__name__}"
                f"{' holding adapters' if isinstance(m, LoraLayer) else ''}: apply LoftQ to float nn.Linear / Conv1D "
                "layers without adapters, before quantize_model")
    quantized, factors = {}, {}
    for key in targets:
        r = config.rank_for(key)
        scale = scaling(r, config.alpha_for(key), config.use_rslora)
        quantized[key], *factors[key] = loftq_factors(linear_weight(modules[key]), r, scale, spec, loftq.loftq_iter)
    for key, q in quantized.items():
        layer = QuantLinear.like(modules[key], spec)
        for tensor_name, tensor in q.tensors().items():
            getattr(layer, tensor_name).copy_(tensor)
        if modules[key].bias is not None:
            layer.bias.copy_(modules[key].bias)
        model.set_submodule(key, layer)
    return {k: (a, b) for k, (a, b) in factors.items()}


@torch.no_grad()
def set_loftq_factors(model: nn.Module, name: str, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Copy the LoftQ start {module: (A, B)} (from `loftq_quantize`) into adapter `name`, just injected with the
    same config on the same modules."""
    layers = dict(lora_layers(model))
    for key, (a0, b0) in factors.items():
        if key not in layers or name not in layers[key].r:
            raise ConfigError(f"LoftQ: module {key!r} holds no adapter {name!r}; inject it with the config given to "
                              "loftq_quantize")
        a, b = layers[key].adapter_tensors(name)
        a.copy_(a0)
        b.copy_(b0)


def inject_loftq(model: nn.Module, config: LoraConfig, name: str = "default", *,
                 loftq_config: Optional[LoftQConfig] = None, block_size: int = 64, double_quant: bool = False,
                 compute_dtype: torch.dtype = torch.float32, activate: bool = True) -> list[str]:
    """`loftq_quantize` the modules `config` targets, then add adapter `name` there starting at the LoftQ factors
    (PEFT's get_peft_model with init_lora_weights="loftq"). `config.init_lora_weights` must be true: the adapter
    is a plain LoRA on the new base. Returns the targeted module names."""
    if config.init_lora_weights is not True:
        raise ConfigError(f"inject_loftq: the adapter is a plain LoRA over the LoftQ base, so its LoraConfig needs "
                          f"init_lora_weights=true, got {config.init_lora_weights!r}")
    if config.use_dora or config.lora_bias:
        raise UnsupportedFeatureError("LoftQ with use_dora or lora_bias is not implemented by loraplex (quantized "
                                      "layers take neither); drop them")
    factors = loftq_quantize(model, config, loftq_config, block_size=block_size, double_quant=double_quant,
                             compute_dtype=compute_dtype)
    targets = inject(model, config, name, activate=activate)
    set_loftq_factors(model, name, factors)
    return targets
