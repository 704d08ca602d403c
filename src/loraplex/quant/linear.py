"""QuantLinear: a frozen quantized replacement of nn.Linear (and GPT-2's Conv1D), and quantize_model.

    y = x @ dequantize(W).T + b        W: (out, in) stored as int8 or packed NF4, b kept in float

How the product is computed is a backend's job, picked once when the layer is built (select_backend)
and stored on the layer; forward never branches on scheme or device. backend="loraplex" (the default) is
pure PyTorch and the reference; backend="bitsandbytes" / "torchao" quantize and compute with those
libraries over the same stored layout (quant/backends.py); others plug in with register_backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from ..errors import QuantConfigError, ShapeMismatchError, UnsupportedModuleError
from ..functional import out_in, weight_layout
from .backends import LIBRARY_BACKENDS, library_backend
from .int8 import Int8Weight, quantize_int8
from .nf4 import NF4Weight, check_block_size, quantize_nf4

QuantizedWeight = Union[Int8Weight, NF4Weight]
SCHEMES = ("int8", "nf4")
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
BACKENDS = ("loraplex", *LIBRARY_BACKENDS)  # library names select_backend takes


@dataclass(frozen=True)
class QuantSpec:
    """How a weight is quantized. block_size and double_quant apply to nf4 only (ignored for int8)."""

    scheme: str  # "int8" | "nf4"
    block_size: int = 64  # nf4: elements per absmax block
    double_quant: bool = False  # nf4: store the block absmax values in 8 bits too
    compute_dtype: torch.dtype = torch.float32  # dtype of dequantize() and of the matmul

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise QuantConfigError(f"unknown quantization scheme {self.scheme!r}; expected one of {SCHEMES}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise QuantConfigError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {self.compute_dtype}")
        if not isinstance(self.double_quant, bool):
            raise QuantConfigError(f"double_quant must be a bool, got {self.double_quant!r}")
        if self.scheme == "int8" and self.double_quant:
            raise QuantConfigError("double_quant applies to scheme 'nf4' only; int8 has one scale per row")
        if self.scheme == "int8":  # block_size means nothing for int8: normalize so equal specs compare equal
            object.__setattr__(self, "block_size", 64)
        if self.scheme == "nf4":
            check_block_size(self.block_size)

    def quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        if self.scheme == "int8":
            return quantize_int8(weight)
        return quantize_nf4(weight, self.block_size, self.double_quant)

    def layout(self, shape: tuple[int, int]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """{buffer name: (shape, dtype)} that a weight of `shape` occupies."""
        if self.scheme == "int8":
            return Int8Weight.layout(shape)
        return NF4Weight.layout(shape, self.block_size, self.double_quant)

    def from_tensors(self, tensors: dict[str, torch.Tensor], shape: tuple[int, int]) -> QuantizedWeight:
        if self.scheme == "int8":
            return Int8Weight.from_tensors(tensors, shape)
        return NF4Weight.from_tensors(tensors, shape, self.block_size)


# ---------------------------------------------------------------------------------------------- backends
class QuantBackend(Protocol):
    """Computes with one scheme's weights on some devices. Stateless; one instance serves every layer."""

    name: str

    def supports(self, spec: QuantSpec, device: torch.device) -> bool: ...

    def quantize(self, weight: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
        """The float (out, in) `weight` quantized per `spec`, in loraplex's stored layout."""
        ...

    def linear(
        self, x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None, dtype: torch.dtype
    ) -> torch.Tensor:
        """x @ dequantize(weight).T + bias in `dtype`; x: (..., in) already in `dtype` -> (..., out)."""
        ...


class _TorchBackend:
    """Pure PyTorch, any device, for the one `scheme`; quantizes with loraplex's own code (QuantSpec.quantize)."""

    name: str
    scheme: str

    def supports(self, spec: QuantSpec, device: torch.device) -> bool:
        return spec.scheme == self.scheme

    def quantize(self, weight, spec):
        return spec.quantize(weight)


class TorchInt8Backend(_TorchBackend):
    """Scales after the matmul: (x @ q.T) * s — skips the (out, in) multiply."""

    name, scheme = "torch-int8", "int8"

    def linear(self, x, weight, bias, dtype):
        y = F.linear(x, weight.qweight.to(dtype)) * weight.scale.to(dtype)  # (..., out)
        return y if bias is None else y + bias.to(dtype)


class TorchNF4Backend(_TorchBackend):
    """Dequantize the packed weight to `dtype`, then one matmul."""

    name, scheme = "torch-nf4", "nf4"

    def linear(self, x, weight, bias, dtype):
        return F.linear(x, weight.dequantize(dtype), None if bias is None else bias.to(dtype))


# Tried in order; a GPU backend registered with register_backend goes first, the torch ones catch the rest.
_BACKENDS: list[QuantBackend] = [TorchInt8Backend(), TorchNF4Backend()]


def register_backend(backend: QuantBackend) -> None:
    """Give `backend` priority over those registered before it (e.g. a bitsandbytes one for CUDA tensors)."""
    _BACKENDS.insert(0, backend)


def select_backend(
    spec: QuantSpec, device: torch.device, backend: str = "loraplex", shape: tuple[int, int] | None = None
) -> QuantBackend:
    """The backend of library `backend` (one of BACKENDS) for `spec` on `device` (for an (out, in) `shape`).

    "loraplex": the first registered backend that supports them (the pure-PyTorch ones last). A library
    backend raises MissingDependencyError without its package, QuantConfigError when it cannot run them.
    """
    if backend != "loraplex":
        if backend not in LIBRARY_BACKENDS:
            raise QuantConfigError(f"unknown quantization backend {backend!r}; expected one of {BACKENDS}")
        return library_backend(backend, spec, torch.device(device), shape)
    for candidate in _BACKENDS:
        if candidate.supports(spec, device):
            return candidate
    raise QuantConfigError(f"no quantization backend supports scheme {spec.scheme!r} on {device}")


# ------------------------------------------------------------------------------------------- the layer
def linear_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight of an nn.Linear, or of a GPT-2 Conv1D (stored (in, out): transposed by type)."""
    if isinstance(module, (nn.Linear, Conv1D)):
        return out_in(module.weight, weight_layout(module))
    raise UnsupportedModuleError(
        f"can only quantize nn.Linear or transformers' Conv1D, got {type(module).__name__}"
    )


class QuantLinear(nn.Module):
    """A frozen quantized linear layer: y = x @ W.T + b with W stored quantized (see module docstring).

    Buffers (in state_dict): int8 -> qweight (out, in) int8, scale (out,) f32;
    nf4 -> packed (ceil(out*in/B)*B/2,) uint8 and absmax (nblocks,) f32, or with double quant
    absmax_code (nblocks,) int8, absmax_scale (ceil(nblocks/256),) f32, absmax_offset (1,) f32.
    `bias` is a frozen float Parameter. `original_weight` (not in state_dict, kept on CPU) is the float
    weight the layer was built from when asked for (keep_original=True), else None; requantize leaves it
    as is, so it stays the pre-merge base.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        spec: QuantSpec,
        *,
        bias: bool = True,
        bias_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        backend: str = "loraplex",
    ) -> None:
        """An all-zero layer of the given size; fill it with requantize() or load_state_dict().

        `backend` (one of BACKENDS) quantizes (requantize) and computes (forward); see select_backend."""
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.spec = spec
        device = torch.device("cpu") if device is None else torch.device(device)
        for name, (shape, dtype) in spec.layout((out_features, in_features)).items():
            self.register_buffer(name, torch.zeros(shape, dtype=dtype, device=device))
        self._tensor_names = tuple(spec.layout((out_features, in_features)))
        b = torch.zeros(out_features, dtype=bias_dtype, device=device) if bias else None
        self.bias = None if b is None else nn.Parameter(b, requires_grad=False)
        self.backend = select_backend(spec, device, backend, (out_features, in_features))
        self._original: torch.Tensor | None = None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        scheme: str,
        *,
        block_size: int = 64,
        double_quant: bool = False,
        compute_dtype: torch.dtype = torch.float32,
        keep_original: bool = False,
        backend: str = "loraplex",
    ) -> QuantLinear:
        """Quantize an nn.Linear (or Conv1D) into a new QuantLinear; `linear` itself is left untouched."""
        spec = QuantSpec(scheme, block_size, double_quant, compute_dtype)
        weight = linear_weight(linear)  # (out, in)
        layer = cls.like(linear, spec, backend)
        layer.requantize(weight)
        if linear.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(linear.bias)
        if keep_original:
            layer._original = weight.detach().to("cpu", copy=True).contiguous()
        return layer

    @classmethod
    def like(cls, module: nn.Module, spec: QuantSpec, backend: str = "loraplex") -> QuantLinear:
        """An all-zero QuantLinear with the size, bias and device of `module` (Linear or Conv1D)."""
        weight = linear_weight(module)  # (out, in)
        bias = module.bias
        return cls(
            weight.shape[1], weight.shape[0], spec,
            bias=bias is not None,
            bias_dtype=bias.dtype if bias is not None else torch.float32,
            device=weight.device,
            backend=backend,
        )

    @property
    def scheme(self) -> str:
        return self.spec.scheme

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.spec.compute_dtype

    @property
    def original_weight(self) -> torch.Tensor | None:
        return self._original

    def quantized_weight(self) -> QuantizedWeight:
        """The stored weight as an Int8Weight / NF4Weight view of the buffers (no copy)."""
        tensors = {name: getattr(self, name) for name in self._tensor_names}
        return self.spec.from_tensors(tensors, (self.out_features, self.in_features))

    def dequantize(self) -> torch.Tensor:
        """W as a float (out, in) tensor in compute_dtype."""
        return self.quantized_weight().dequantize(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.backend.linear(x.to(self.compute_dtype), self.quantized_weight(), self.bias, self.compute_dtype)
        return y.to(x.dtype)  # (..., out)

    @torch.no_grad()
    def requantize(self, weight: torch.Tensor) -> None:
        """Replace the stored weight by the quantization of the float `weight` (out, in). Bias is unchanged."""
        expected = (self.out_features, self.in_features)
        if tuple(weight.shape) != expected:
            raise ShapeMismatchError(
                f"requantize expects a weight of shape (out_features, in_features) = {expected}, "
                f"got {tuple(weight.shape)}"
            )
        quantized = self.backend.quantize(weight, self.spec)
        for name, tensor in quantized.tensors().items():
            getattr(self, name).copy_(tensor)

    def nbytes(self) -> int:
        """Real storage bytes: the quantized weight's tensors plus the float bias."""
        bias = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return self.quantized_weight().nbytes() + bias

    def extra_repr(self) -> str:
        extra = f", block_size={self.spec.block_size}, double_quant={self.spec.double_quant}" * (
            self.scheme == "nf4"
        )
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"scheme={self.scheme!r}{extra}, compute_dtype={self.compute_dtype}, backend={self.backend.name}"
        )


# ------------------------------------------------------------------------------------------ whole models
@dataclass(frozen=True)
class QuantReport:
    """What quantize_model did, in real storage bytes (parameters + buffers)."""

    spec: QuantSpec
    modules: tuple[str, ...]  # names of the modules replaced by QuantLinear, in model order
    bytes_before: int  # whole model
    bytes_after: int
    replaced_bytes_before: int  # the replaced modules only
    replaced_bytes_after: int

    @property
    def ratio(self) -> float:
        """bytes_after / bytes_before of the whole model."""
        return self.bytes_after / self.bytes_before

    def __str__(self) -> str:
        return (
            f"{self.spec.scheme}: {len(self.modules)} modules, model {self.bytes_before:,} -> "
            f"{self.bytes_after:,} bytes ({self.ratio:.3f}x); replaced layers {self.replaced_bytes_before:,} -> "
            f"{self.replaced_bytes_after:,} bytes"
        )


def module_nbytes(module: nn.Module) -> int:
    """Bytes of all parameters and buffers of `module` (shared tensors counted once)."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def _skipped(name: str, skip: tuple[str, ...]) -> bool:
    """True when `name` ends with a skip entry at a module-name boundary ("lm_head" skips "x.lm_head")."""
    return any(name == s or name.endswith("." + s) for s in skip)


def quantize_model(
    model: nn.Module,
    scheme: str,
    *,
    skip: tuple[str, ...] = ("lm_head",),
    block_size: int = 64,
    double_quant: bool = False,
    keep_original: bool = False,
    compute_dtype: torch.dtype = torch.float32,
    backend: str = "loraplex",
) -> QuantReport:
    """Replace, IN PLACE, every nn.Linear / Conv1D of `model` not named by `skip` with a QuantLinear.

    `backend` (one of BACKENDS) quantizes and computes every new layer; the stored layout, and so
    save_quantized / load_quantized / merge, are the same for all backends.
    Modules that are already QuantLinear are left alone. Quantize the base before injecting LoRA
    wrappers: any nn.Linear inside them would be quantized too. Returns the report; `model` is the result.
    """
    spec = QuantSpec(scheme, block_size, double_quant, compute_dtype)
    if isinstance(skip, str):
        raise QuantConfigError(f"skip must be a tuple of module-name suffixes, got the string {skip!r}")
    skip = tuple(skip)
    targets = [
        (name, m) for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, Conv1D)) and name and not _skipped(name, skip)
    ]
    bytes_before = module_nbytes(model)
    replaced_before = replaced_after = 0
    for name, module in targets:
        layer = QuantLinear.from_linear(
            module, scheme, block_size=block_size, double_quant=double_quant,
            compute_dtype=compute_dtype, keep_original=keep_original, backend=backend,
        )
        replaced_before += module_nbytes(module)
        replaced_after += layer.nbytes()
        model.set_submodule(name, layer)
    return QuantReport(
        spec=spec,
        modules=tuple(name for name, _ in targets),
        bytes_before=bytes_before,
        bytes_after=module_nbytes(model),
        replaced_bytes_before=replaced_before,
        replaced_bytes_after=replaced_after,
    )
