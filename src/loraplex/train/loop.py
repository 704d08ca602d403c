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

The per-row loss is loss.py's (`row_losses`); one adapter's state (tensors, data, AdamW + schedule) is job.py's;
the settings (`TrainConfig`, checked once) are config.py's.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from ..inject import route_rows
from . import checkpoint as ckpt_mod
from ..errors import NonFiniteError, WriteError
from .config import (  # noqa: F401  (importable from here, as before)
    DATA_INITS, INIT_FIELDS, INT_LIMIT, NUMERIC_FIELDS, TrainConfig, check_numbers,
)
from .data import IGNORE_INDEX, Batcher
from . import fsdp
from .distributed import DistInfo, all_reduce_sum, barrier, gather_objects, shard, wrap
from .job import Job, adapter_params, lr_factor, make_optimizer  # noqa: F401  (importable from here, as before)
from .loss import (  # noqa: F401  (importable from here, as before)
    FAST_LOSS_TYPES, concat_batches, head_logits, row_losses, row_losses_reference, target_count,
)

METRICS_FILE = "metrics.jsonl"


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
