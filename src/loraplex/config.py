"""LoraConfig: the fields of PEFT's adapter_config.json that define a LoRA adapter, validated on construction.

Serialized with `to_dict()` it is a valid PEFT `adapter_config.json`; `from_dict()` reads PEFT's files and
refuses keys whose semantics loraplex does not implement (layer replication, target_parameters, ...).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Union

from .errors import ConfigError, UnsupportedFeatureError
from .models import canonical_base_id

ALL_LINEAR = "all-linear"
BIAS_MODES = ("none", "all", "lora_only")
# init_lora_weights: FRESH_INIT_MODES can start a new adapter; "eva" is plain LoRA on disk (the base is left as it
# was), so a saved file is read like any other, but loraplex does not implement that initialization.
# RESIDUAL_INITS (PiSSA, its fast-SVD form pissa_niter_<N>, OLoRA) start a new adapter from the base weight and
# rewrite that weight in memory to the residual W - scale * B0 @ A0; loraplex saves them converted to a plain LoRA
# on the original base (rank 2r, init_lora_weights=true), so a file with one of these names is never plain LoRA.
FRESH_INIT_MODES = (True, False, "gaussian", "orthogonal")
INIT_MODES = (*FRESH_INIT_MODES, "eva")
RESIDUAL_INITS = ("pissa", "pissa_niter_<N>", "olora")
_PISSA_NITER = re.compile(r"pissa_niter_[0-9]+")
# PEFT initializations that rewrite the base weights (PiSSA/OLoRA/CorDA/LoRA-GA keep a residual base, LoftQ a
# quantized one) or change training (MiCA freezes lora_B): their files are not a plain LoRA on the original base.
_REFUSED_INITS = {
    "pissa": "PiSSA replaced the base weights by a residual",
    "olora": "OLoRA replaced the base weights by a residual",
    "corda": "CorDA replaced the base weights by a residual",
    "lora_ga": "LoRA-GA replaced the base weights by a residual",
    "loftq": "LoftQ replaced the base weights by quantized ones (a new LoftQ adapter: loraplex.quant.loftq."
             "inject_loftq, which saves it as a plain LoRA on that quantized base)",
    "mica": "MiCA trains A only (lora_B frozen), which loraplex does not implement",
}
TASK_TYPES = ("CAUSAL_LM", "SEQ_2_SEQ_LM", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")

# PEFT config keys loraplex understands but which carry no semantics for it (bookkeeping).
_IGNORED_KEYS = {
    "peft_type", "auto_mapping", "revision", "peft_version", "megatron_core", "runtime_config",
    "loftq_config", "eva_config", "corda_config", "lora_ga_config", "qalora_group_size", "velora_config",
    "monteclora_config", "kasa_config", "ensure_weight_tying", "direction", "scale", "stable_gamma",
    "num_samples", "use_entropy", "dirichlet_prior", "sample_scaler", "kl_loss_weight", "buffer_size",
}
# PEFT keys that change what the adapter computes: accepted only at their "off" value.
_OFF_VALUES: dict[str, tuple[Any, ...]] = {
    "layer_replication": (None, []),
    "target_parameters": (None, []),
    "alora_invocation_tokens": (None, []),
    "use_qalora": (False, None),
    "megatron_config": (None, {}),
    "arrow_config": (None, {}),
    "use_bdlora": (False, None),
}

StrList = Union[list[str], str, None]


@dataclass
class LoraConfig:
    """A LoRA adapter's definition (PEFT field names and meanings).

    r: rank of the update B @ A.  lora_alpha: numerator of the scale (scale = alpha / r, or alpha / sqrt(r)
    with use_rslora).  target_modules: module names (list: exact name or name suffix after a dot), a regex
    matched against the full module name (str), or "all-linear" (every Linear/Conv1D but the output head).
    rank_pattern / alpha_pattern: {regex: value} overriding r / lora_alpha for modules whose name ends with a
    match (PEFT's `(.*\\.)?(pattern)$` rule).
    use_dora: weight-decomposed LoRA (DoRA): each targeted module also learns a magnitude m (out,), and
    computes y = m / ||W + scale B A||_row * (x @ (W + scale B A).T) + bias (see functional.py, docs/concepts.md).
    lora_bias: lora_B has a bias b (out,) too (PEFT's LoRA-B bias): y = base(x) + scale * (B A x + b), on linear
    layers; merging adds scale * b to the base bias.
    trainable_token_indices: token ids whose input-embedding rows the adapter replaces by its own (PEFT's
    trainable tokens, loraplex.tokens); a list, or {module name suffix: list} with one entry. Served by the
    multi-adapter runtime and the server; `inject` (training, load_adapter) refuses it.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: StrList = None
    exclude_modules: StrList = None
    layers_to_transform: Union[list[int], int, None] = None
    layers_pattern: StrList = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    bias: str = "none"
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    modules_to_save: Union[list[str], None] = None
    init_lora_weights: Union[bool, str] = True
    base_model_name_or_path: Union[str, None] = None
    task_type: Union[str, None] = None
    inference_mode: bool = False
    use_dora: bool = False
    lora_bias: bool = False
    trainable_token_indices: Union[list[int], dict[str, list[int]], None] = None

    def __post_init__(self) -> None:
        _check_rank("r", self.r)
        _check_alpha("lora_alpha", self.lora_alpha)
        if (not isinstance(self.lora_dropout, (int, float)) or isinstance(self.lora_dropout, bool)
                or not 0.0 <= self.lora_dropout < 1.0):
            raise ConfigError(f"lora_dropout must be a float in [0, 1), got {self.lora_dropout!r}")
        self.target_modules = _check_str_list("target_modules", self.target_modules)
        if self.target_modules is None:
            raise ConfigError(
                "target_modules is required: a list of module names, a regex, or 'all-linear' "
                "(e.g. ['q_proj', 'v_proj'])"
            )
        self.exclude_modules = _check_str_list("exclude_modules", self.exclude_modules)
        self.layers_pattern = _check_str_list("layers_pattern", self.layers_pattern)
        if isinstance(self.target_modules, str):
            _check_regex("target_modules", self.target_modules)
            if self.layers_to_transform is not None or self.layers_pattern is not None:
                raise ConfigError("layers_to_transform and layers_pattern need target_modules as a list, not a "
                                  f"regex string; got target_modules={self.target_modules!r}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError(f"layers_pattern={self.layers_pattern!r} only selects layers for layers_to_transform; "
                              "set layers_to_transform too (e.g. [0, 1]) or drop layers_pattern")
        if isinstance(self.exclude_modules, str):
            _check_regex("exclude_modules", self.exclude_modules)
        if self.layers_to_transform is not None:
            ltt = self.layers_to_transform
            items = [ltt] if isinstance(ltt, int) else ltt
            if not isinstance(items, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                      for i in items):
                raise ConfigError(f"layers_to_transform must be a non-negative int or a list of them, got {ltt!r}")
        for what in ("rank_pattern", "alpha_pattern"):
            if not isinstance(getattr(self, what), dict):
                raise ConfigError(f"{what} must be a mapping {{regex: value}}, got {getattr(self, what)!r}")
        for name, value in self.rank_pattern.items():
            _check_regex("rank_pattern key", name)
            _check_rank(f"rank_pattern[{name!r}]", value)
        for name, value in self.alpha_pattern.items():
            _check_regex("alpha_pattern key", name)
            _check_alpha(f"alpha_pattern[{name!r}]", value)
        if not isinstance(self.use_dora, bool):
            raise ConfigError(f"use_dora must be true or false, got {self.use_dora!r}")
        if not isinstance(self.lora_bias, bool):
            raise ConfigError(f"lora_bias must be true or false, got {self.lora_bias!r}")
        if self.lora_bias and (self.use_dora or is_residual_init(self.init_lora_weights)):
            other = "use_dora=true" if self.use_dora else f"init_lora_weights={self.init_lora_weights!r}"
            raise UnsupportedFeatureError(f"lora_bias=true with {other} is not implemented by loraplex (PEFT refuses "
                                          "it too); use lora_bias with plain LoRA and a non-residual init")
        if self.bias not in BIAS_MODES:
            raise ConfigError(f"bias must be one of {BIAS_MODES}, got {self.bias!r}")
        if not is_residual_init(self.init_lora_weights):
            _check_init(self.init_lora_weights)
        for what in ("use_rslora", "fan_in_fan_out", "inference_mode"):
            if not isinstance(getattr(self, what), bool):
                raise ConfigError(f"{what} must be true or false, got {getattr(self, what)!r}")
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ConfigError(f"task_type must be one of {TASK_TYPES} or None, got {self.task_type!r}")
        if self.base_model_name_or_path is not None:
            if not isinstance(self.base_model_name_or_path, str):
                raise ConfigError(f"base_model_name_or_path must be a string, got {self.base_model_name_or_path!r}")
            self.base_model_name_or_path = canonical_base_id(self.base_model_name_or_path)
        self.trainable_token_indices = _check_token_indices(self.trainable_token_indices)
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str):
                self.modules_to_save = [self.modules_to_save]
            _check_str_list("modules_to_save", self.modules_to_save)

    # -- per-module values -------------------------------------------------------------------------------
    def rank_for(self, module_name: str) -> int:
        """r for `module_name`, after rank_pattern."""
        return self.rank_pattern.get(_pattern_key(self.rank_pattern, module_name), self.r)

    def alpha_for(self, module_name: str) -> float:
        """lora_alpha for `module_name`, after alpha_pattern."""
        return self.alpha_pattern.get(_pattern_key(self.alpha_pattern, module_name), self.lora_alpha)

    # -- serialization -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A PEFT-compatible adapter_config.json mapping."""
        d = dataclasses.asdict(self)
        if isinstance(d["target_modules"], list):
            d["target_modules"] = sorted(d["target_modules"])
        d.update(peft_type="LORA", layer_replication=None, revision=None)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LoraConfig":
        """Read a PEFT adapter_config.json mapping; refuse keys that change semantics we do not implement."""
        peft_type = data.get("peft_type", "LORA")
        if str(peft_type).upper() != "LORA":
            raise UnsupportedFeatureError(f"adapter is of peft_type {peft_type!r}; loraplex reads only 'LORA'")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in known:
                kwargs[key] = value
            elif key in _OFF_VALUES:
                if value not in _OFF_VALUES[key]:
                    raise UnsupportedFeatureError(
                        f"adapter config sets {key}={value!r}, which loraplex does not implement; "
                        f"expected {key} to be one of {_OFF_VALUES[key]}"
                    )
            elif key not in _IGNORED_KEYS:
                raise UnsupportedFeatureError(
                    f"unknown adapter config key {key!r}={value!r}: its meaning is unknown to loraplex, "
                    "so the adapter cannot be applied faithfully"
                )
        if "init_lora_weights" in kwargs:  # a file made with a residual init is relative to the residual base
            _check_init(kwargs["init_lora_weights"])
        if isinstance(kwargs.get("target_modules"), (set, tuple)):
            kwargs["target_modules"] = list(kwargs["target_modules"])
        for key in ("use_dora", "lora_bias"):
            if key in kwargs and kwargs[key] is None:  # older PEFT files write null for "off"
                kwargs[key] = False
        kwargs["rank_pattern"] = kwargs.get("rank_pattern") or {}
        kwargs["alpha_pattern"] = kwargs.get("alpha_pattern") or {}
        return cls(**kwargs)


def is_residual_init(init: Any) -> bool:
    """Is `init` one of RESIDUAL_INITS ("pissa", "pissa_niter_4", "olora"), which rewrite the base weight?"""
    return isinstance(init, str) and (init in ("pissa", "olora") or _PISSA_NITER.fullmatch(init) is not None)


def is_fresh_init(init: Any) -> bool:
    """Can loraplex initialize a new adapter with `init` (FRESH_INIT_MODES or RESIDUAL_INITS)?"""
    return isinstance(init, bool) or (isinstance(init, str) and init in FRESH_INIT_MODES) or is_residual_init(init)


def _pattern_key(patterns: dict[str, Any], module_name: str) -> str | None:
    """The first pattern whose regex matches the end of `module_name` at a dot boundary (PEFT's rule)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


def _check_rank(what: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")


def _check_alpha(what: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{what} must be a positive finite number, got {value!r}")


def _check_init(init: Any) -> None:
    """init_lora_weights must be in INIT_MODES; PEFT's base-rewriting initializations are refused by name."""
    if isinstance(init, bool) or (isinstance(init, str) and init in INIT_MODES):
        return
    refused = isinstance(init, str) and next((k for k in _REFUSED_INITS if init.lower().startswith(k)), None)
    if refused:
        raise UnsupportedFeatureError(
            f"init_lora_weights={init!r}: {_REFUSED_INITS[refused]}, so the adapter is not a plain LoRA on the "
            "original base and loraplex cannot apply it faithfully. Convert it with PEFT first "
            "(save_pretrained(..., path_initial_model_for_weight_conversion=...) turns PiSSA/OLoRA/CorDA into a "
            "plain LoRA with init_lora_weights=true; loraplex's own PiSSA/OLoRA adapters are saved that way)"
        )
    raise ConfigError(f"init_lora_weights must be one of {INIT_MODES} (or, for a new adapter, {RESIDUAL_INITS}), "
                      f"got {init!r}")


def _check_regex(what: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"{what} {pattern!r} is not a valid regular expression: {exc}") from None


def _check_str_list(what: str, value: Any) -> StrList:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, set)) and all(isinstance(v, str) and v for v in value):
        return list(value)
    raise ConfigError(f"{what} must be a string or a list of non-empty strings, got {value!r}")


def _check_token_indices(value: Any) -> Union[list[int], dict[str, list[int]], None]:
    """trainable_token_indices: None (also [] / {}), a list of distinct ids >= 0, or {module suffix: such a list}
    with one entry (loraplex serves trainable tokens on the input embedding only)."""
    if value in (None, [], {}):
        return None
    ids = value
    if isinstance(value, dict):
        if len(value) != 1 or not all(isinstance(k, str) and k for k in value):
            raise UnsupportedFeatureError(f"trainable_token_indices={value!r}: loraplex serves trainable tokens on "
                                          "one module, the input embedding; give a list of ids or {name: ids}")
        (ids,) = value.values()
    if (not isinstance(ids, list) or not ids or len(set(ids)) != len(ids)
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)):
        raise ConfigError(f"trainable_token_indices must list distinct token ids >= 0, got {value!r}")
    return value
