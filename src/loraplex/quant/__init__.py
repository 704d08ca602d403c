"""Quantized frozen bases: int8 (per-row absmax) and NF4 (QLoRA 4-bit), pure PyTorch."""

from .int8 import Int8Weight, quantize_int8
from .io import load_quantized, read_quant_config, save_quantized
from .linear import (
    BACKENDS,
    QuantBackend,
    QuantLinear,
    QuantReport,
    QuantSpec,
    module_nbytes,
    quantize_model,
    register_backend,
    select_backend,
)
from .nf4 import NF4_CODEBOOK, NF4Weight, quantize_nf4

__all__ = [
    "BACKENDS",
    "Int8Weight",
    "NF4Weight",
    "NF4_CODEBOOK",
    "QuantBackend",
    "QuantLinear",
    "QuantReport",
    "QuantSpec",
    "load_quantized",
    "module_nbytes",
    "quantize_int8",
    "quantize_model",
    "quantize_nf4",
    "read_quant_config",
    "register_backend",
    "save_quantized",
    "select_backend",
]
