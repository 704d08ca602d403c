"""The training loop: AdamW over the adapters' tensors, warmup + cosine, accumulation, clipping, eval, resume.

One optimizer step of one adapter ("job") consumes `grad_accum` micro-batches of its own Batcher
(each micro-batch holds batch_size * world_size rows: the global micro-batch, split across ranks), and
    loss_job = sum over the step's target tokens of -log p(token) / (target tokens of the whole step)
so accumulation, data parallelism and several adapters in one batch all give the gradient of the same
per-token mean (see distributed.py). Several jobs train in ONE forward/backward: their rows are
concatenated and `route_rows` sends each row through its own adapter; the summed loss is sum_j loss_j, and
since adapter j's tensors only touch j's rows, d(sum)/d(theta_j) = d(loss_j)/d(theta_j). With its own
AdamW, schedule, clipping norm and Batcher per job, each adapter gets exactly the updates it would get if
trained alone with the same settings (up to float summation order; with dropout 0, since masks are
drawn from one RNG stream).

The per-row loss is loss.py's (`row_losses`); one adapter's state (tensors, data, AdamW + schedule) is job.py's.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path
from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn as nn

from ..inject import route_rows
from . import checkpoint as ckpt_mod
from ..config import ALL_LINEAR, FRESH_INIT_MODES, RESIDUAL_INITS, is_fresh_init, is_residual_init
from ..device import parse_device
from ..errors import ConfigError, NonFiniteError, WriteError
from ..quant import QuantSpec
from .data import IGNORE_INDEX, Batcher
from . import fsdp
from .distributed import DistInfo, all_reduce_sum, barrier, gather_objects, shard, wrap
from .job import Job, adapter_params, lr_factor, make_optimizer  # noqa: F401  (importable from here, as before)
from .loss import (  # noqa: F401  (importable from here, as before)
    FAST_LOSS_TYPES, concat_batches, head_logits, row_losses, row_losses_reference, target_count,
)

METRICS_FILE = "metrics.jsonl"


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


# ---- the loss module DDP / FSDP wrap ---------------------------------------------------------------------

class LossModule(nn.Module):
    """What DDP wraps: forward(batch) -> per-row loss sums (B,)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return row_losses(self.model, batch)


# ---- the loop --------------------------------------------------------------------------------------------

class Trainer:
    """Runs jobs to completion over one model; rank 0 writes metrics/checkpoints under `out` (if given).

    `module`: the loss module already sharded by fsdp.shard (the jobs' params must be taken after sharding);
    None: the loop wraps `LossModule(model)` itself (DDP under torchrun). `fingerprint`: the base fingerprint
    recorded in checkpoints (taken before sharding; None: computed from `model` at save time)."""

    def __init__(self, model: nn.Module, jobs: Sequence[Job], config: TrainConfig, info: DistInfo = DistInfo(),
                 out: Optional[Path] = None, *, identity: Optional[dict] = None, base_name: Optional[str] = None,
                 pad_id: int = 0, module: Optional[nn.Module] = None, fingerprint: Optional[dict] = None) -> None:
        self.model, self.jobs, self.config, self.info, self.out = model, list(jobs), config, info, out
        self.routed = len(self.jobs) > 1  # several adapters: route rows; otherwise the active adapter runs
        # several adapters: a finished adapter (or a short last step) leaves tensors without gradients
        self.module = module if module is not None else wrap(LossModule(model), info,
                                                             find_unused_parameters=self.routed)
        self.sharded, self.fingerprint = fsdp.is_sharded(self.module), fingerprint
        # bf16 without FSDP: autocast (FSDP's mixed-precision policy casts the sharded parameters instead)
        self.autocast = (torch.autocast(info.device.type, dtype=torch.bfloat16) if config.bf16 and not self.sharded
                         else contextlib.nullcontext())
        self.identity, self.base_name, self.pad_id = identity or {}, base_name, pad_id
        self.step, self.tokens, self.elapsed = 0, 0, 0.0
        self.rows: list[dict[str, Any]] = []
        self.total_steps = max(j.total_steps for j in self.jobs)
        every = config.eval_every
        self.eval_every = max(1, math.ceil(self.total_steps / 4)) if every is None else every

    def _route(self, names: list[str]):
        return route_rows(self.model, names) if self.routed else contextlib.nullcontext()

    # -- evaluation --------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, job: Job) -> Optional[float]:
        """Mean next-token loss over the job's held-out examples (whole batches split across ranks; every rank
        runs the same number of forwards, the missing ones on batch 0 with weight 0, as FSDP needs)."""
        if not job.eval_unique:
            return None
        self.model.eval()
        bs, world = self.config.batch_size, self.info.world_size
        total = torch.zeros(2, dtype=torch.float64, device=self.info.device)  # (weighted loss sum, target count)
        batches = list(Batcher(job.eval_unique, bs, seed=0, shuffle=False, pad_id=self.pad_id))
        for k in range(self.info.rank, math.ceil(len(batches) / world) * world, world):
            batch = batches[k] if k < len(batches) else batches[0]
            rows = batch["input_ids"].shape[0]
            w = (torch.tensor(job.eval_weights[k * bs:(k + 1) * bs], dtype=torch.float64) if k < len(batches)
                 else torch.zeros(rows, dtype=torch.float64)).to(self.info.device)
            batch = {key: v.to(self.info.device) for key, v in batch.items()}
            with self._route([job.name] * rows), self.autocast:
                losses = self.module(batch).double()
            n = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1).double()
            total += torch.stack([(losses * w).sum(), (n * w).sum()])
        self.model.train()
        total = all_reduce_sum(total, self.info).cpu()
        return float(total[0] / total[1])

    # -- one optimizer step for every unfinished job -------------------------------------------------------
    def train_step(self) -> dict[str, dict[str, float]]:
        info, world, bs = self.info, self.info.world_size, self.config.batch_size
        active = [j for j in self.jobs if not j.done]
        micro = {j.name: [j.next_micro() for _ in range(j.micro_in_step())] for j in active}
        targets = {n: max(1, sum(target_count(b) for b in bs_)) for n, bs_ in micro.items()}  # global counts
        tokens = {n: sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
                         for b in bs_) for n, bs_ in micro.items()}
        n_micro = max(len(b) for b in micro.values())
        for job in self.jobs:
            for p in job.params:
                p.grad = None
        self.model.train()
        sums = torch.zeros(len(active), dtype=torch.float64, device=info.device)  # on the device: no sync per micro
        for m in range(n_micro):
            parts, names, spans = [], [], []
            for j in active:
                if m < len(micro[j.name]):
                    part = {k: v.to(info.device) for k, v in shard(micro[j.name][m], info, bs).items()}
                    spans.append((len(names), len(names) + part["input_ids"].shape[0], active.index(j)))
                    names += [j.name] * part["input_ids"].shape[0]
                    parts.append(part)
            batch = concat_batches(parts, self.pad_id)
            sync = m == n_micro - 1 or not info.enabled or self.sharded  # FSDP reduce-scatters every micro-batch
            with (contextlib.nullcontext() if sync else self.module.no_sync()), self._route(names), self.autocast:
                losses = self.module(batch)  # (B,) per-row sums
                loss = sum(losses[a:b].sum() * (world / targets[active[k].name]) for a, b, k in spans)
                loss.backward()
            for a, b, k in spans:
                sums[k] += losses[a:b].detach().double().sum()
        sums = all_reduce_sum(sums, info).cpu()  # the step's one copy to the host
        out = {}
        max_norm = self.config.max_grad_norm or float("inf")
        for k, job in enumerate(active):
            norm = fsdp.clip_grad_norm(job.params, max_norm)  # per adapter, after the all-reduce
            lr = job.optimizer.param_groups[0]["lr"]
            loss_k = float(sums[k]) / targets[job.name]
            if not (math.isfinite(loss_k) and math.isfinite(float(norm))):  # same on every rank: both are reduced
                raise NonFiniteError(f"training diverged at step {self.step + 1}: adapter {job.name!r} has loss "
                                     f"{loss_k} and gradient norm {float(norm)} (lr {lr:g}); this step was not "
                                     "applied and nothing more is saved (an earlier checkpoint stays usable): "
                                     "lower --lr or --alpha, or clip with --max-grad-norm")
            job.optimizer.step()
            job.scheduler.step()
            job.steps_done += 1
            out[job.name] = {"loss": loss_k, "lr": lr, "grad_norm": float(norm),
                             "tokens": tokens[job.name], "target_tokens": targets[job.name]}
        return out

    # -- bookkeeping ------------------------------------------------------------------------------------------
    def _record(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if self.out is not None and self.info.is_main:
            try:
                with open(self.out / METRICS_FILE, "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
                    f.flush()
            except OSError as exc:
                raise WriteError(f"cannot append to {str(self.out / METRICS_FILE)!r}: {exc}") from exc

    def restore(self, ckpt: "ckpt_mod.Checkpoint") -> None:
        """Continue from a checkpoint: jobs, step, counters, this rank's RNG and the metrics so far."""
        ckpt_mod.check_compatible(ckpt, self.identity, self.info.world_size)
        state, trainer = ckpt.state, ckpt.trainer
        for job in self.jobs:
            optimizer = trainer["optimizers"][job.name]
            job.restore(state["jobs"][job.name], None if self.sharded else optimizer, trainer["schedulers"][job.name])
            if self.sharded:
                fsdp.load_optimizer_state(self.module, job.optimizer, optimizer)
        self.step, self.tokens, self.elapsed = state["step"], state["tokens"], state["elapsed"]
        ckpt_mod.set_rng_state(trainer["rng"][self.info.rank])
        lines = state["metrics_lines"]
        if self.out is not None:
            path = self.out / METRICS_FILE
            kept = path.read_text(encoding="utf-8").splitlines()[:lines] if path.exists() else []
            self.rows = [json.loads(line) for line in kept]
            barrier(self.info)  # everyone has read before rank 0 rewrites
            if self.info.is_main:
                path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def save_checkpoint(self) -> None:
        rng = gather_objects(ckpt_mod.rng_state(), self.info)
        optimizers = {j.name: (fsdp.optimizer_state(self.module, j.optimizer) if self.sharded
                               else j.optimizer.state_dict()) for j in self.jobs}  # sharded: a collective
        with self.full_adapters():
            if self.info.is_main and self.out is not None:
                state = {"step": self.step, "world_size": self.info.world_size, "metrics_lines": len(self.rows),
                         "identity": self.identity, "tokens": self.tokens, "elapsed": self.elapsed,
                         "jobs": {j.name: j.state() for j in self.jobs}}
                ckpt_mod.save_checkpoint(self.out, model=self.model, adapters=[j.name for j in self.jobs],
                                         state=state, optimizers=optimizers,
                                         schedulers={j.name: j.scheduler for j in self.jobs}, rng=rng,
                                         base_name=self.base_name, fingerprint=self.fingerprint)
        barrier(self.info)

    def full_adapters(self):
        """Context in which the adapters are full tensors on every rank (see fsdp.full_adapters)."""
        return fsdp.full_adapters(self.model) if self.sharded else contextlib.nullcontext()

    def run(self, *, progress: Optional[bool] = None) -> list[dict[str, Any]]:
        """Train every job to its last step; returns the metrics rows (also appended to out/metrics.jsonl)."""
        from tqdm.auto import tqdm

        cfg = self.config
        if self.step == 0:
            torch.manual_seed(cfg.seed + self.info.rank)  # dropout masks; a resumed run restores the state
            for job in self.jobs:
                job.eval_before = self.evaluate(job)
                self._record({"step": 0, "adapter": job.name, "eval_loss": job.eval_before})
        show = self.info.is_main and (sys.stderr.isatty() if progress is None else progress)
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not show, file=sys.stderr, unit="step",
                   dynamic_ncols=True, desc="train")
        pending: dict[str, list[dict[str, float]]] = {}
        try:
            while not all(j.done for j in self.jobs):
                start = time.perf_counter()
                stats = self.train_step()
                took = time.perf_counter() - start
                self.step += 1
                self.elapsed += took
                step_tokens = sum(s["tokens"] for s in stats.values())
                self.tokens += step_tokens
                for name, s in stats.items():
                    pending.setdefault(name, []).append({**s, "seconds": took, "step_tokens": step_tokens})
                for job in self.jobs:
                    if job.name not in stats:
                        continue
                    last = job.done
                    evaluate = last or (self.eval_every > 0 and self.step % self.eval_every == 0)
                    if not (last or evaluate or self.step % cfg.log_every == 0):
                        continue
                    got = pending.pop(job.name)
                    row = {"step": self.step, "adapter": job.name,
                           "loss": sum(g["loss"] for g in got) / len(got), "lr": got[-1]["lr"],
                           "grad_norm": got[-1]["grad_norm"], "tokens": sum(g["tokens"] for g in got),
                           "tokens_per_s": (sum(g["step_tokens"] for g in got)
                                            / max(sum(g["seconds"] for g in got), 1e-9)),
                           "elapsed_s": round(self.elapsed, 3)}
                    if evaluate:
                        row["eval_loss"] = self.evaluate(job)
                        if last:
                            job.eval_after = row["eval_loss"]
                    self._record(row)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}", refresh=False)
                bar.update(1)
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.total_steps:
                    self.save_checkpoint()
        finally:
            bar.close()
        return self.rows
