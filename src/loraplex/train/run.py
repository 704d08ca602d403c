"""`train(TrainConfig) -> TrainResult`: load the base and data, inject adapters, run the loop, write outputs.

Output directory (rank 0 writes; each file replaced atomically):
    DIR/adapter_config.json + adapter_model.safetensors   the adapter (one adapter), PEFT-loadable
    DIR/<name>/...                                        one adapter directory per source (out_per_data)
    DIR/metrics.jsonl    one JSON row per logged step and adapter (flushed as written)
    DIR/loss.png         train and eval loss curves (skipped, with a warning, without the 'plot' extra)
    DIR/train_summary.json   params, peak memory, tokens, time, eval loss before/after
    DIR/checkpoint/      the last checkpoint (with save_every); `resume` continues from it
    DIR/loftq-base/      init "loftq": the LoftQ-quantized base the adapters belong to (quant/io.py format)
"""

from __future__ import annotations

import gc
import logging
import math
import os
import re
import resource
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ..config import LoraConfig, is_residual_init
from ..errors import ConfigError, DataError, OutputExistsError, WriteError
from ..extras import available
from ..identity import base_fingerprint
from ..inject import find_targets, freeze_base, inject, set_active
from ..models import load_base
from ..report import parameter_report
from ..outputs import check_output, write_json
from ..quant.io import save_quantized
from ..quant.loftq import set_loftq_factors
from ..store import load_adapter, load_residual_state, save_adapter
from . import checkpoint as ckpt_mod
from . import fsdp
from .data import Examples, split, tokenize
from .data_inits import LOFTQ_BASE, eva_batches, eva_config, forward_no_cache, loftq_base
from .eva import inject_eva
from .distributed import barrier, broadcast_object, gather_objects, init_distributed, shutdown
from .loop import METRICS_FILE, Job, LossModule, Trainer, TrainConfig, adapter_params
from .plot import plot_losses
from .sources import load_records

SUMMARY_FILE = "train_summary.json"
LOSS_PNG = "loss.png"


@dataclass
class TrainResult:
    out: Path
    adapters: dict[str, Path]  # adapter name -> its directory
    steps: int
    eval_loss_before: dict[str, Optional[float]]
    eval_loss_after: dict[str, Optional[float]]
    summary: dict[str, Any] = field(default_factory=dict)  # what train_summary.json holds
    resumed_from: Optional[int] = None  # the checkpoint step this run continued from


def source_name(source: str) -> str:
    """Adapter name of a data source: the file stem (a.jsonl -> a) or the topic (chatterbot:tech_support ->
    tech_support), with characters outside [A-Za-z0-9_-] replaced by '_'."""
    stem = source.partition(":")[2] if source.startswith(("chatterbot:", "fortunes:")) else Path(source).stem
    return re.sub(r"[^A-Za-z0-9_-]", "_", stem)[:64] or "data"


def peak_rss_bytes() -> int:
    """This process's peak resident set size in bytes.

    Linux: VmHWM of /proc/self/status, the high-water mark of this program's own memory. (getrusage's
    ru_maxrss is not used there: Linux carries it across fork + exec, so a process started by a large
    parent would report the parent's peak.) Elsewhere: ru_maxrss (macOS reports bytes, others KiB).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # "VmHWM:   123456 kB"
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def rank_memory(device: torch.device) -> dict[str, Optional[int]]:
    """This process's memory after training: peak and current RSS (VmRSS; None without /proc), and the peak
    CUDA memory allocated on `device` (None off CUDA). What FSDP shrinks is the current (sharded) state."""
    rss = None
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            rss = next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:")), None)
    except OSError:
        pass
    cuda = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"peak_rss_bytes": peak_rss_bytes(), "rss_bytes": rss, "peak_cuda_bytes": cuda}


def _prepare_out(config: TrainConfig, is_main: bool) -> bool:
    """The overwrite rule (outputs.check_output) for a run's folder: new or empty, --overwrite, or --resume of an
    earlier run there; never a file, the base or a data file. --overwrite removes only what an earlier run wrote
    (metrics, checkpoint, summary); the adapter files are replaced when the new ones are complete. Returns
    whether this call created OUT."""
    out = config.out
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--out {str(out)!r} is a file; train writes a directory: choose another path")
    earlier = [p for p in (out / METRICS_FILE, out / ckpt_mod.CHECKPOINT_DIR, out / SUMMARY_FILE, out / LOFTQ_BASE)
               if p.exists()]
    check_output(out, overwrite=True, inputs=[p for p in (config.base, *config.data) if Path(p).exists()])
    try:
        check_output(out, overwrite=config.overwrite or (config.resume and bool(earlier)))
    except OutputExistsError as exc:
        raise OutputExistsError(f"{exc}. For train: --resume continues an earlier run there, --overwrite starts "
                                "over") from None
    created = is_main and not out.exists()
    if is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise WriteError(f"cannot create --out {str(out)!r}: {exc}") from exc
        if config.overwrite and not config.resume:
            for p in earlier:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    return created


def _check_rank(model: torch.nn.Module, lora: LoraConfig) -> None:
    """Refuse a rank above min(in, out) of a targeted layer (its delta cannot use more) before allocating."""
    modules = dict(model.named_modules())
    for key in find_targets(model, lora):
        m = modules[key]
        w = getattr(m, "weight", None)
        dims = ((m.in_features, m.out_features) if hasattr(m, "in_features") else
                (w.shape[0], math.prod(w.shape[1:])) if w is not None else ())
        if dims and lora.r > min(dims):
            raise ConfigError(f"--rank {lora.r} exceeds min(in, out) = {min(dims)} of the targeted layer {key!r}; "
                              f"a LoRA delta there has rank <= {min(dims)}: pass --rank {min(dims)} or less, or "
                              "target other modules")


def _load_data(config: TrainConfig, tokenizer) -> tuple[dict[str, tuple[list, list]], dict[str, Any]]:
    """{adapter name: (train examples, eval examples)} and per-source facts for the summary."""
    groups = ({source_name(s): [s] for s in config.data} if config.out_per_data else {"default": list(config.data)})
    if config.out_per_data and len(groups) != len(config.data):
        raise ConfigError(f"--out-per-data: expected data sources with distinct names, got {config.data} "
                          f"-> {[source_name(s) for s in config.data]}; rename the files")
    facts: dict[str, Any] = {}
    out = {}
    for name, sources in groups.items():
        examples = Examples()
        for source in sources:
            records = load_records(source, skip_bad=config.skip_bad)
            tok = tokenize(records, tokenizer, max_length=config.max_length)
            facts[source] = {"records": len(records), "skipped": records.skipped, "examples": len(tok),
                             "truncated": tok.truncated, "dropped": tok.dropped}
            examples.extend(tok)
        if not examples:
            raise DataError(f"data {sources}: no usable example (every record was skipped or had no target token)")
        out[name] = split(examples, config.eval_split, config.seed)
    return out, facts


def train(config: TrainConfig) -> TrainResult:
    """Train one adapter (or one per source with out_per_data) on `config.base`; see the module doc."""
    info = init_distributed(config.device)
    try:
        return _train(config, info)
    finally:
        # free the model now: FSDP's hooks form reference cycles that would otherwise live until interpreter
        # exit, where releasing their gloo work objects aborts the process (SIGABRT)
        gc.collect()
        shutdown(info)


def _train(config: TrainConfig, info) -> TrainResult:
    if config.fsdp and not info.enabled:
        raise ConfigError("--fsdp shards the model over the processes of a torchrun job, got one process; launch "
                          "with `torchrun --nproc-per-node N -m loraplex train --fsdp ...` (N >= 2) or drop --fsdp")
    created = _prepare_out(config, info.is_main)
    try:
        return _run(config, info)
    except BaseException:  # a run that fails before writing anything leaves no empty OUT it made behind
        if created and config.out.is_dir() and not any(config.out.iterdir()):
            config.out.rmdir()
        raise


def _run(config: TrainConfig, info) -> TrainResult:
    barrier(info)
    # FSDP: only rank 0 reads the base; the others build it on the meta device (see fsdp.py)
    # EVA needs activations and LoftQ quantized weights on every rank: those load the full base everywhere
    from_rank0 = (config.fsdp and config.quantize == "none" and not is_residual_init(config.init)
                  and config.init not in ("eva", "loftq"))
    model, tokenizer = (fsdp.load_base_rank0(config.base, config.num_layers, info) if from_rank0
                        else load_base(config.base, num_layers=config.num_layers))
    if tokenizer is None:
        raise ConfigError(f"base {config.base!r} has no tokenizer; training needs a model directory with one "
                          "(e.g. 'smollm2', or a directory saved with model and tokenizer)")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout, use_dora=config.use_dora,
                      init_lora_weights=True if config.init == "loftq" else config.init, target_modules=config.targets,
                      base_model_name_or_path=config.base)
    loftq = None
    if config.quantize != "none":
        from ..quant import quantize_model

        if config.init == "loftq":  # the targets get their LoftQ quantization, the rest the plain one
            _check_rank(model, lora)
            loftq = loftq_base(model, lora, config)
        # before inject: LoRA then wraps the QuantLinear layers (TrainConfig keeps nf4's options default for int8)
        quantize_model(model, config.quantize, block_size=config.quant_block_size, double_quant=config.double_quant)
    if not config.fsdp:  # FSDP moves each rank's shards to the device; the whole base never goes there
        model.to(info.device)
    data, facts = _load_data(config, tokenizer)
    found = ckpt_mod.find_checkpoint(config.out) if config.resume else None
    ckpt = ckpt_mod.load_checkpoint(found) if found is not None else None
    _check_rank(model, lora)
    if loftq is not None and info.is_main:  # the base the adapters belong to (before any wrapper goes in)
        save_quantized(model, config.out / LOFTQ_BASE)
    on_meta = next(model.parameters()).is_meta  # FSDP, rank > 0: shapes only, filled from rank 0 when sharded
    for name, (train_set, _) in data.items():
        if on_meta:
            inject(model, lora, name, activate=False)
        elif ckpt is not None and ckpt.adapter_dir(name).is_dir() and is_residual_init(config.init):
            inject(model, lora, name, seed=config.seed, activate=False)  # the same residual base and (A0, B0) ...
            load_residual_state(model, name, ckpt.adapter_dir(name))  # ... then the checkpoint's A, B (and m)
        elif ckpt is not None and ckpt.adapter_dir(name).is_dir():
            load_adapter(model, ckpt.adapter_dir(name), name, activate=False)
        elif config.init == "eva":  # from this adapter's own training batches
            inject_eva(model, lora, eva_batches(train_set, config, pad_id), name, eva_config=eva_config(config),
                       forward_fn=forward_no_cache, activate=False, max_batches=config.eva_max_batches)
        else:  # every adapter starts from the same seed: as if each were trained alone
            inject(model, lora, name, seed=config.seed, activate=False)
            if loftq is not None:
                set_loftq_factors(model, name, loftq)
    freeze_base(model, None)
    for name in data:
        for p in adapter_params(model, name):
            p.requires_grad_(True)
    module = fingerprint = None
    if config.fsdp:  # before the jobs take their parameters: sharding replaces them
        fingerprint = broadcast_object(base_fingerprint(model) if info.is_main else None, info)
        module = (fsdp.shard_from_rank0 if from_rank0 else fsdp.shard)(LossModule(model), model, info,
                                                                       bf16=config.bf16)
    loaded_peak = peak_rss_bytes()  # the peak up to here: loading (and sharding) the base, before any step
    jobs = [Job(name, adapter_params(model, name), train_set, eval_set, config, info.world_size, pad_id)
            for name, (train_set, eval_set) in data.items()]
    set_active(model, next(iter(data)) if len(data) == 1 else [])
    trainer = Trainer(model, jobs, config, info, config.out, identity=config.identity(), base_name=config.base,
                      pad_id=pad_id, module=module, fingerprint=fingerprint)
    if ckpt is not None:
        trainer.restore(ckpt)
    trainer.run(progress=config.progress)
    memory = gather_objects({**rank_memory(info.device), "load_peak_rss_bytes": loaded_peak}, info)  # per rank
    result = _finish(config, model, trainer, facts, memory, info.is_main, ckpt)
    barrier(info)
    return result


def _finish(config, model, trainer: Trainer, facts, memory, is_main: bool, ckpt) -> TrainResult:
    out = config.out
    adapters = {j.name: (out if len(trainer.jobs) == 1 else out / j.name) for j in trainer.jobs}
    report = parameter_report(model)
    summary = {
        "adapters": {j.name: {"path": str(adapters[j.name]), "trainable_params": sum(p.numel() for p in j.params),
                              "train_examples": j.train_examples, "eval_examples": j.eval_examples,
                              "steps": j.steps_done, "eval_loss_before": j.eval_before,
                              "eval_loss_after": j.eval_after} for j in trainer.jobs},
        "trainable_params": report.trainable, "frozen_params": report.frozen,
        "peak_rss_bytes": max(m["peak_rss_bytes"] for m in memory), "memory_per_rank": memory,
        "peak_cuda_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "steps": trainer.step, "tokens": trainer.tokens, "train_seconds": round(trainer.elapsed, 3),
        "tokens_per_s": trainer.tokens / max(trainer.elapsed, 1e-9), "world_size": trainer.info.world_size,
        "resumed_from_step": ckpt.state["step"] if ckpt is not None else None, "data": facts,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
    }
    with trainer.full_adapters():  # FSDP: gathers the adapter shards (every rank enters)
        if is_main:
            for job in trainer.jobs:
                _save_into(model, job.name, adapters[job.name], config.base, shared=adapters[job.name] == out,
                           fingerprint=trainer.fingerprint)
    if is_main:
        if available("plot"):
            plot_losses(trainer.rows, out / LOSS_PNG, title=f"loraplex train: {config.base}", overwrite=True)
        else:
            logging.getLogger(__name__).warning(f"{LOSS_PNG} not drawn: matplotlib is not installed "
                                                "(pip install 'loraplex[plot]')")
        write_json(out / SUMMARY_FILE, summary, overwrite=True)
    return TrainResult(out, adapters, trainer.step, {j.name: j.eval_before for j in trainer.jobs},
                       {j.name: j.eval_after for j in trainer.jobs}, summary,
                       ckpt.state["step"] if ckpt is not None else None)


def _save_into(model, name: str, directory: Path, base: str, *, shared: bool, fingerprint=None) -> None:
    """save_adapter replaces its whole directory; a `shared` DIR also holds metrics and checkpoints, so the
    adapter is written beside and its files moved in (each os.replace is atomic; weights first, config last)."""
    if not shared:  # OUT/<name>: _prepare_out already applied the overwrite rule to OUT
        save_adapter(model, name, directory, base_name=base, overwrite=True, fingerprint=fingerprint)
        return
    staging = directory / ".adapter.tmp"  # a killed run's staging is ours to replace
    save_adapter(model, name, staging, base_name=base, overwrite=True, fingerprint=fingerprint)
    for f in sorted(staging.iterdir(), key=lambda p: p.suffix == ".json"):
        os.replace(f, directory / f.name)
    staging.rmdir()
