"""An adapter file on its own: PEFT's directory layout and key format, reading, verifying and decoding it into
per-module LoRA factors. No model is involved here; store.py puts files into models and writes them out.

A directory holds adapter_config.json + adapter_model.safetensors (or a legacy adapter_model.bin). Tensor keys
(adapter name removed, PEFT's `base_model.model.` prefix), e.g. for a Llama q_proj:
    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight     (r, in)
    base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight     (out, r)
    base_model.model.model.embed_tokens.lora_embedding_A               (r, vocab)
    base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector   (out,)  DoRA's m (in memory:
                                                                         ...lora_magnitude_vector.<name>.weight)
    base_model.model.lm_head.weight                                     modules_to_save copy
loraplex's own facts ride in the safetensors metadata header, which PEFT ignores:
    loraplex.version, loraplex.content_hash, loraplex.base_fingerprint (JSON).
`read_adapter` checks a file alone (config, tensor dtypes, NaN/Inf, every LoRA factor pair against its config
rank and target_modules: `lora_factors`); `lora_modules` is the one decoder of its LoRA tensors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Optional

import torch
from safetensors import SafetensorError, safe_open

from .config import ALL_LINEAR, LoraConfig
from .errors import AdapterFileError, ConfigError, NonFiniteError, ShapeMismatchError, UnsupportedFeatureError
from .functional import scaling
from .identity import content_hash
from .inject import matches
from .outputs import PathLike

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
# suffix of a LoRA factor's key -> (factor, embedding layout); the module name is the key without the suffix
FACTOR_SUFFIXES = {".lora_A.weight": ("A", False), ".lora_B.weight": ("B", False),
                   ".lora_embedding_A": ("A", True), ".lora_embedding_B": ("B", True)}
MAGNITUDE_SUFFIX = ".lora_magnitude_vector"  # DoRA's m of the module named by the key without it


@dataclass
class AdapterFile:
    """A verified adapter directory in memory. `tensors` keys are model-relative (prefix stripped)."""

    path: Path
    config: LoraConfig
    tensors: dict[str, torch.Tensor]
    content_hash: str
    base_fingerprint: Optional[dict[str, Any]] = None
    loraplex_version: Optional[str] = None
    raw_config: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


# -- reading ------------------------------------------------------------------------------------------------
def read_adapter(directory: PathLike) -> AdapterFile:
    """Read and verify an adapter directory on its own, before any base is involved: config semantics, LoRA
    factors (`lora_factors`: pairs, dtypes, ranks, target_modules), no NaN/Inf, the content hash if recorded.
    Nothing is allocated beyond the file's tensors; every error names the directory or file."""
    path = Path(directory)
    if not path.is_dir():
        raise AdapterFileError(f"adapter path {str(path)!r} is not a directory; expected a folder holding "
                               f"{CONFIG_NAME} and {WEIGHTS_NAME}")
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        raise AdapterFileError(f"{str(path)!r} has no {CONFIG_NAME}; found {sorted(p.name for p in path.iterdir())}")
    try:
        raw = json.loads(cfg_file.read_text())
    except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, an int past Python's digit limit, deep nesting
        raise AdapterFileError(f"{cfg_file} is not valid JSON: {type(exc).__name__}: {str(exc)[:200]}") from None
    if not isinstance(raw, dict):
        raise AdapterFileError(f"{cfg_file} must hold a JSON object, got {type(raw).__name__}")
    try:
        config = LoraConfig.from_dict(raw)
    except (ConfigError, UnsupportedFeatureError) as exc:
        raise type(exc)(f"{cfg_file}: {exc}") from None
    tensors, meta = _read_tensors(path)
    for key, t in tensors.items():
        if not key.startswith(PREFIX):
            raise AdapterFileError(f"tensor key {key!r} in {path} lacks PEFT's {PREFIX!r} prefix")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise NonFiniteError(f"adapter {str(path)!r} holds NaN/Inf in {key!r}")
    fp = meta.get("loraplex.base_fingerprint")
    try:
        fingerprint = json.loads(fp) if fp else None
    except (ValueError, RecursionError) as exc:
        raise AdapterFileError(f"{path / WEIGHTS_NAME}: its loraplex.base_fingerprint metadata is not valid JSON "
                               f"({type(exc).__name__}); re-save the adapter") from None
    af = AdapterFile(path, config, {k[len(PREFIX):]: v for k, v in tensors.items()}, "",
                     fingerprint, meta.get("loraplex.version"), raw)
    lora_factors(af)
    af.content_hash = content_hash(raw, tensors)
    recorded = meta.get("loraplex.content_hash")
    if recorded is not None and recorded != af.content_hash:
        raise AdapterFileError(f"adapter {str(path)!r} content hash {af.content_hash[:12]} != recorded "
                               f"{recorded[:12]}: the files were modified or corrupted after saving")
    return af


class LoraModule(NamedTuple):
    """One module's LoRA as a file holds it (see `lora_modules`)."""

    a: torch.Tensor  # (r, in[, *k]); embedding: (r, num_embeddings)
    b: torch.Tensor  # (out, r[, 1, ...]); embedding: (dim, r)
    scale: float  # lora_alpha / r (or / sqrt(r)) after rank_pattern / alpha_pattern
    embedding: bool  # stored as lora_embedding_A/B (an nn.Embedding target)
    magnitude: Optional[torch.Tensor]  # DoRA's m ((out,), a conv's (1, out, 1[, 1])) when use_dora, else None
    keys: tuple[str, ...]  # the file keys (prefix stripped) it was read from


def lora_modules(af: AdapterFile) -> dict[str, LoraModule]:
    """The one decoder of an adapter file's LoRA tensors: {module name: LoraModule}, checked without a base, e.g.
        "model.layers.0.self_attn.q_proj": LoraModule(A (r, in), B (out, r), lora_alpha / r, False, None,
            ("model.layers.0.self_attn.q_proj.lora_A.weight", "model.layers.0.self_attn.q_proj.lora_B.weight"))
    (embeddings: A (r, num_embeddings), B (dim, r); convolutions: A (r, in, *kernel), B (out, r, 1, ...)).
    With use_dora each module's `<module>.lora_magnitude_vector` rides along as `magnitude` (None if absent);
    every other tensor (modules_to_save copies, biases, ...) is left to the caller: the keys no entry lists.
    Refuses (naming the file): a factor without its partner, or a DoRA magnitude without factors
    (AdapterFileError), a non-floating factor (AdapterFileError), a rank other than the config's r for that
    module after rank_pattern (ShapeMismatchError, so a config's r never sizes an allocation), a module the
    config's target_modules does not select (AdapterFileError; "all-linear" depends on the base:
    `validate_adapter` checks it)."""
    what, config = f"adapter {str(af.path)!r}", af.config
    found: dict[str, dict[str, tuple[str, torch.Tensor, bool]]] = {}  # module -> {"A"/"B": (key, tensor, embedding)}
    magnitudes: dict[str, str] = {}  # module -> key of its DoRA magnitude
    for key, t in af.tensors.items():
        if config.use_dora and key.endswith(MAGNITUDE_SUFFIX):
            magnitudes[key[: -len(MAGNITUDE_SUFFIX)]] = key
        suffix = next((sfx for sfx in FACTOR_SUFFIXES if key.endswith(sfx)), None)
        if suffix is None:
            continue
        if not t.is_floating_point():
            raise AdapterFileError(f"{what}: {key!r} holds {t.dtype} values; LoRA factors must be floating point "
                                   "(float32, bfloat16, float16)")
        role, embedding = FACTOR_SUFFIXES[suffix]
        found.setdefault(key[: -len(suffix)], {})[role] = (key, t, embedding)
    orphans = sorted(k for m, k in magnitudes.items() if m not in found)
    if orphans:
        raise AdapterFileError(f"{what} holds DoRA magnitudes without LoRA factors: {orphans[:3]}; expected "
                               "lora_A and lora_B beside each lora_magnitude_vector")
    all_linear = isinstance(config.target_modules, str) and config.target_modules.lower() == ALL_LINEAR
    out: dict[str, LoraModule] = {}
    for module, parts in sorted(found.items()):
        if set(parts) != {"A", "B"} or parts["A"][2] != parts["B"][2]:
            raise AdapterFileError(f"{what} holds {sorted(k for k, _, _ in parts.values())} for {module!r}; "
                                   "expected both lora_A and lora_B (or lora_embedding_A and lora_embedding_B)")
        a, b, r = parts["A"][1], parts["B"][1], config.rank_for(module)
        if a.dim() < 2 or b.dim() < 2 or a.shape[0] != r or b.shape[1] != r:
            raise ShapeMismatchError(f"{what} at {module!r}: its config declares r={r} (after rank_pattern) but the "
                                     f"file holds lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; expected lora_A "
                                     f"({r}, ...) and lora_B (..., {r}). Fix r/rank_pattern in {CONFIG_NAME}")
        if not all_linear and not matches(config, module):
            raise AdapterFileError(f"{what} holds LoRA weights for {module!r}, which its config does not target "
                                   f"(target_modules={config.target_modules!r}, exclude_modules="
                                   f"{config.exclude_modules!r}, layers_to_transform={config.layers_to_transform!r})")
        m_key = magnitudes.get(module)
        keys = (parts["A"][0], parts["B"][0]) + ((m_key,) if m_key else ())
        out[module] = LoraModule(a, b, scaling(r, config.alpha_for(module), config.use_rslora), parts["A"][2],
                                 af.tensors[m_key] if m_key else None, keys)
    return out


def lora_factors(af: AdapterFile) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """The LoRA factors of `af` per module, {module name: (A, B, scale)}, as `lora_modules` decodes and checks
    them, e.g. "model.layers.0.self_attn.q_proj": (A (r, in), B (out, r), lora_alpha / r)."""
    return {module: (x.a, x.b, x.scale) for module, x in lora_modules(af).items()}


def unread_keys(af: AdapterFile, modules: dict[str, LoraModule]) -> list[str]:
    """The keys of `af`'s tensors (file order) that no entry of `modules` (from `lora_modules(af)`) was read from:
    modules_to_save copies, trained biases, base-weight copies, or tensors of unknown role."""
    read = {k for x in modules.values() for k in x.keys}
    return [k for k in af.tensors if k not in read]


def factor_keys(module: str, embedding: bool) -> tuple[str, str]:
    """The file keys (prefix stripped) of a module's A and B."""
    return ((f"{module}.lora_embedding_A", f"{module}.lora_embedding_B") if embedding
            else (f"{module}.lora_A.weight", f"{module}.lora_B.weight"))


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    st, legacy = path / WEIGHTS_NAME, path / LEGACY_WEIGHTS_NAME
    if st.is_file():
        try:
            with safe_open(str(st), framework="pt") as fh:
                return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})
        except (SafetensorError, OSError, ValueError) as exc:
            raise AdapterFileError(f"{st} is not a readable safetensors file: {exc}") from None
    if legacy.is_file():
        try:
            obj = torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for bad pickles; all mean "unreadable file"
            raise AdapterFileError(f"{legacy} could not be read safely (weights_only=True): {exc}") from None
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise AdapterFileError(f"{legacy} must hold a dict of tensors")
        return obj, {}
    raise AdapterFileError(f"{str(path)!r} has no {WEIGHTS_NAME} (or legacy {LEGACY_WEIGHTS_NAME})")
