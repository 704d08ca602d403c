"""`TrainConfig`: everything `train` needs, checked once in __post_init__ (the CLI flags of `loraplex train`
map one to one, cli/train.py); and the numeric rule table those checks (and workflows/evaluate.py's) run on.

    check_numbers("TrainConfig", {"lr": 0.0}, NUMERIC_FIELDS)
    -> ConfigError: TrainConfig.lr (--lr): expected a finite number > 0, got 0.0
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Union

from ..config import ALL_LINEAR, FRESH_INIT_MODES, RESIDUAL_INITS, is_fresh_init, is_residual_init
from ..device import parse_device
from ..errors import ConfigError
from ..quant import QuantSpec

INT_LIMIT = 2**31 - 1  # the largest count or seed a TrainConfig int may hold
# Every numeric TrainConfig field: (int or float, None allowed, what it must be, the check). Floats must be
# finite (NaN/inf refused before the check); bools are never numbers here.
NUMERIC_FIELDS: dict[str, tuple[type, bool, str, Any]] = {
    "rank": (int, False, f"an int in [1, {INT_LIMIT}]", lambda v: 1 <= v <= INT_LIMIT),
    "alpha": (float, False, "a finite number > 0", lambda v: v > 0),
    "dropout": (float, False, "a number in [0, 1)", lambda v: 0 <= v < 1),
    "lr": (float, False, "a finite number > 0", lambda v: v > 0),
    "weight_decay": (float, False, "a finite number >= 0", lambda v: v >= 0),
    "warmup_ratio": (float, False, "a number in [0, 1)", lambda v: 0 <= v < 1),
    "max_grad_norm": (float, False, "a finite number >= 0 (0 disables clipping)", lambda v: v >= 0),
    "epochs": (int, False, f"an int in [1, {INT_LIMIT}]", lambda v: 1 <= v <= INT_LIMIT),
    "max_steps": (int, True, f"an int in [0, {INT_LIMIT}]", lambda v: 0 <= v <= INT_LIMIT),
    "batch_size": (int, False, f"an int in [1, {INT_LIMIT}]", lambda v: 1 <= v <= INT_LIMIT),
    "grad_accum": (int, False, f"an int in [1, {INT_LIMIT}]", lambda v: 1 <= v <= INT_LIMIT),
    "max_length": (int, False, f"an int in [1, {INT_LIMIT}]", lambda v: 1 <= v <= INT_LIMIT),
    "eval_split": (float, False, "a number in [0, 1)", lambda v: 0 <= v < 1),
    "eval_every": (int, True, f"an int in [0, {INT_LIMIT}]", lambda v: 0 <= v <= INT_LIMIT),
    "log_every": (int, False, f"an int in [1, {INT_LIMIT}]", lambda v: 1 <= v <= INT_LIMIT),
    "seed": (int, False, f"an int in [0, {INT_LIMIT}]", lambda v: 0 <= v <= INT_LIMIT),
    "save_every": (int, False, f"an int in [0, {INT_LIMIT}]", lambda v: 0 <= v <= INT_LIMIT),
    "quant_block_size": (int, False, f"an int in [1, {INT_LIMIT}]", lambda v: 1 <= v <= INT_LIMIT),
    "num_layers": (int, True, f"an int in [0, {INT_LIMIT}]", lambda v: 0 <= v <= INT_LIMIT),
    "eva_rho": (float, False, "a finite number >= 1", lambda v: v >= 1),
    "eva_tau": (float, False, "a number in [0, 1]", lambda v: 0 <= v <= 1),
    "eva_max_batches": (int, False, f"an int in [1, {INT_LIMIT}]", lambda v: 1 <= v <= INT_LIMIT),
    "loftq_iter": (int, False, f"an int in [1, {INT_LIMIT}]", lambda v: 1 <= v <= INT_LIMIT),
}
# init-specific TrainConfig fields: init -> {field: default}; a field off its default needs its init
INIT_FIELDS: dict[str, dict[str, Any]] = {
    "eva": {"eva_rho": 2.0, "eva_tau": 0.99, "eva_label_mask": True, "eva_whiten": False, "eva_adjust_scaling": True,
            "eva_max_batches": 1000},
    "loftq": {"loftq_iter": 1},
}
DATA_INITS = tuple(INIT_FIELDS)  # inits train/run.py performs itself: EVA (train/eva.py), LoftQ (quant/loftq.py)


def check_numbers(owner: str, values: dict[str, Any], rules: dict[str, tuple[type, bool, str, Any]]) -> None:
    """ConfigError naming the first of `values` that breaks its rule (kind, None allowed, meaning, check): a
    kind-int value must be an int, a kind-float one a finite int or float; bools are neither."""
    for key, value in values.items():
        kind, optional, meaning, ok = rules[key]
        if value is None and optional:
            continue
        number = not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else int)
        try:
            number = number and (kind is int or math.isfinite(value))
        except OverflowError:  # an int too large for a float
            number = False
        if not number or not ok(value):
            raise ConfigError(f"{owner}.{key} (--{key.replace('_', '-')}): expected {meaning}"
                              f"{' or None' if optional else ''}, got {value!r}")


@dataclass
class TrainConfig:
    """Everything `train` needs; the CLI flags of `loraplex train` map one to one (--grad-accum -> grad_accum).

    Batches: batch_size rows per process per micro-batch; an optimizer step sees
    batch_size * world_size * grad_accum rows. epochs counts passes over each adapter's training split;
    max_steps (when set) overrides it and the data repeats as needed.
    """

    base: str  # load_base spec: "smollm2", a transformers directory, ...
    data: Union[list[str], str]  # sources: x.jsonl, chatterbot:TOPIC, fortunes:CATEGORY
    out: Union[str, Path]
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    use_dora: bool = False  # DoRA: also learn a per-output-row magnitude (LoraConfig.use_dora)
    init: Union[bool, str] = True  # LoraConfig.init_lora_weights: FRESH_INIT_MODES, RESIDUAL_INITS or DATA_INITS
    targets: Union[str, list[str]] = ALL_LINEAR  # "all-linear", a regex, or module names
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1  # of the optimizer steps
    max_grad_norm: float = 1.0  # 0 disables clipping
    epochs: int = 1
    max_steps: Optional[int] = None
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 512  # tokens per example (padding) or per packed row
    eval_split: float = 0.1  # fraction of distinct examples held out per source
    eval_every: Optional[int] = None  # steps; None: 4 evaluations over the run; 0: before and at the end only
    log_every: int = 1
    seed: int = 0
    packing: bool = False
    save_every: int = 0  # steps between checkpoints; 0: none
    resume: bool = False  # continue from out/checkpoint when there is one
    overwrite: bool = False  # start over in an out directory that holds an earlier run
    skip_bad: bool = False
    quantize: str = "none"  # "none" | "int8" | "nf4": QLoRA over a quantized frozen base
    quant_block_size: int = 64  # nf4: elements per absmax block (smaller: closer to the float base, more bytes)
    double_quant: bool = False  # nf4: store the block absmax values in 8 bits too
    num_layers: Optional[int] = None
    eva_rho: float = 2.0  # init "eva" (EvaConfig): max rank per layer round(rank * rho)
    eva_tau: float = 0.99  # init "eva": cosine similarity at which a component has converged
    eva_label_mask: bool = True  # init "eva": only tokens with a target (label != -100) feed the SVD
    eva_whiten: bool = False  # init "eva": divide A's rows by sqrt(singular value)
    eva_adjust_scaling: bool = True  # init "eva": alpha_l = alpha * r_l / rank, so every layer keeps alpha / rank
    eva_max_batches: int = 1000  # init "eva": forward passes before an unconverged EVA stops (DataError)
    loftq_iter: int = 1  # init "loftq" (LoftQConfig): alternations of quantize / SVD; bits follow --quantize
    out_per_data: bool = False  # one adapter per data source, all trained in one pass: out/<name>/
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N" | "mps" (loraplex.device)
    fsdp: bool = False  # under torchrun: shard base and adapters with FSDP2 (fsdp.py) instead of DDP
    bf16: bool = False  # bf16 compute over fp32 adapter weights (FSDP mixed precision, else autocast)
    progress: Optional[bool] = None  # progress bar on stderr; None: only when stderr is a terminal

    def __post_init__(self) -> None:
        self.data = [self.data] if isinstance(self.data, str) else list(self.data)
        if not self.data:
            raise ConfigError("TrainConfig.data: expected at least one data source, got none")
        check_numbers("TrainConfig", {key: getattr(self, key) for key in NUMERIC_FIELDS}, NUMERIC_FIELDS)
        if not is_fresh_init(self.init) and self.init not in DATA_INITS:
            raise ConfigError(f"TrainConfig.init: expected one of {FRESH_INIT_MODES}, {RESIDUAL_INITS} or "
                              f"{DATA_INITS}, got {self.init!r}")
        for init, fields in INIT_FIELDS.items():
            off = [k for k, default in fields.items() if getattr(self, k) != default]
            if off and self.init != init:
                raise ConfigError(f"TrainConfig: {off} apply to init={init!r}, got init={self.init!r}")
            if any(not isinstance(getattr(self, k), bool) for k, d in fields.items() if isinstance(d, bool)):
                raise ConfigError(f"TrainConfig: {[k for k, d in fields.items() if isinstance(d, bool)]} must be "
                                  "true or false")
        if self.init in DATA_INITS and self.use_dora:
            raise ConfigError(f"TrainConfig.init={self.init!r} with use_dora is not implemented; drop --dora")
        if self.init == "loftq" and self.quantize == "none":
            raise ConfigError("TrainConfig.init='loftq' quantizes the base so that base + adapter start near the "
                              "float weights: it needs quantize='nf4' or 'int8' (--quantize nf4)")
        if is_residual_init(self.init) and (self.quantize != "none" or (self.out_per_data and len(self.data) > 1)):
            raise ConfigError(f"TrainConfig.init={self.init!r} rewrites the frozen base weights for one adapter: it "
                              "needs a float base (quantize='none') and one adapter (not out_per_data over several "
                              "sources)")
        if self.quantize not in ("none", "int8", "nf4"):
            raise ConfigError(f"TrainConfig.quantize: expected 'none', 'int8' or 'nf4', got {self.quantize!r}")
        if self.quantize != "nf4" and (self.quant_block_size != 64 or self.double_quant):
            raise ConfigError(f"TrainConfig: quant_block_size and double_quant apply to quantize='nf4', "
                              f"got quantize={self.quantize!r}")
        if self.quantize == "nf4":
            QuantSpec("nf4", self.quant_block_size, self.double_quant)  # QuantConfigError on a bad block size
        self.device = parse_device(self.device)
        self.out = Path(self.out)

    def identity(self) -> dict[str, Any]:
        """The settings a resumed run must share with its checkpoint (all that change the result); init-specific
        fields only when set off their defaults, so checkpoints written before those fields existed still match."""
        keep = {"out", "resume", "overwrite", "progress", "save_every", "log_every", "eval_every", "device"}
        unset = {k for fields in INIT_FIELDS.values() for k, d in fields.items() if getattr(self, k) == d}
        return {k: v for k, v in asdict(self).items() if k not in keep | unset}
