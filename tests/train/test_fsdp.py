"""FSDP2 training: `torchrun --nproc-per-node 2 -m loraplex train --fsdp` (gloo, 2 CPU processes) shards the
base and two adapters trained in one pass, and gives the adapters one process gives with the same global
batch, within fp32 tolerance; a run whose rank 1 is SIGKILLed after a checkpoint, resumed, gives the adapters
of a run never killed; bf16 mixed precision trains fp32 adapters close to the fp32 run; QLoRA (nf4) works too."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from loraplex.errors import ConfigError
from loraplex.functional import tolerance
from loraplex.train import TrainConfig, train

from train_helpers import FSDP_SETTINGS as SETTINGS
from train_helpers import assert_same, data, finish, subprocess_env, tensors, tiny_base  # noqa: F401  (fixtures)
from train_helpers import TORCHRUN, flags

# 18 + 12 training rows, global micro-batch 8: rank 1's slice is empty in some last batches of an epoch
NAMES = ("a", "b")


def torchrun(tiny_base: Path, data: dict, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "loraplex", "train", "--fsdp",
           "--base", str(tiny_base), "--out", str(out), "--batch-size", "4", "--data", str(data["a"]), "--data",
           str(data["b"]), "--out-per-data", "--save-every", "3", *flags(SETTINGS), *extra]
    return subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def metrics(out: Path) -> list[dict]:
    strip = ("tokens_per_s", "elapsed_s")
    return [{k: v for k, v in json.loads(line).items() if k not in strip}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def fsdp_run(tiny_base, data, tmp_path_factory):  # noqa: F811
    """The uninterrupted 2-process FSDP run (its stdout and out directory)."""
    out = tmp_path_factory.mktemp("fsdp") / "run"
    return finish(torchrun(tiny_base, data, out)), out


def test_fsdp_two_processes_equal_one_process(fsdp_run, tiny_base, data, tmp_path):  # noqa: F811
    stdout, out = fsdp_run
    one = train(TrainConfig(base=str(tiny_base), data=[str(data[n]) for n in NAMES], out=tmp_path / "one",
                            batch_size=8, out_per_data=True, progress=False, **SETTINGS))
    assert "processes         2" in stdout
    for name in NAMES:
        assert_same(tensors(out / name), tensors(one.out / name), exact=False)
        cfg = json.loads((out / name / "adapter_config.json").read_text())
        assert cfg["r"] == 8 and cfg["peft_type"] == "LORA"  # a normal PEFT adapter, written by rank 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == one.steps and summary["config"]["fsdp"]
    atol, rtol = tolerance(torch.float32)
    rows, ref = metrics(out), metrics(one.out)
    assert [(r["step"], r["adapter"]) for r in rows] == [(r["step"], r["adapter"]) for r in ref]
    for a, b in zip(rows, ref):
        for key in ("loss", "eval_loss", "tokens", "grad_norm"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=rtol * 10, abs=atol), (key, a, b)


def _rank_pids(launcher: int) -> dict[int, int]:
    """{rank: pid} of the workers torchrun (pid `launcher`) started, read from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            env = dict(kv.split("=", 1) for kv in (entry / "environ").read_text().split("\0") if "=" in kv)
        except (OSError, ValueError, IndexError):
            continue
        if parent == launcher and "RANK" in env:
            found[int(env["RANK"])] = int(entry.name)
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's workers through /proc")
def test_fsdp_resume_after_sigkill_of_one_rank(fsdp_run, tiny_base, data, tmp_path):  # noqa: F811
    """SIGKILL rank 1 once a checkpoint exists (torchrun then stops rank 0), resume with --resume: the adapters
    and metrics equal the uninterrupted run's (same kernels, same reduction order, state restored)."""
    _, whole = fsdp_run
    killed = tmp_path / "killed"
    run = torchrun(tiny_base, data, killed)
    deadline = time.monotonic() + 150
    try:
        while not (killed / "checkpoint" / "state.json").exists():
            assert run.poll() is None, run.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no checkpoint after 150 s"
            time.sleep(0.01)
        os.kill(_rank_pids(run.pid)[1], signal.SIGKILL)
        run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode != 0
    assert not (killed / "a" / "adapter_model.safetensors").exists(), "the run finished before it could be killed"
    at = json.loads((killed / "checkpoint" / "state.json").read_text())["step"]
    stdout = finish(torchrun(tiny_base, data, killed, "--resume"))
    assert f"resumed from the checkpoint at step {at}" in stdout
    for name in NAMES:
        assert_same(tensors(killed / name), tensors(whole / name), exact=True)
    assert metrics(killed) == metrics(whole)


def test_fsdp_needs_torchrun(tiny_base, data, tmp_path):  # noqa: F811
    with pytest.raises(ConfigError, match="torchrun"):
        train(TrainConfig(base=str(tiny_base), data=str(data["a"]), out=tmp_path / "x", fsdp=True, progress=False))


def test_fsdp_bf16_mixed_precision_trains_fp32_adapters_close_to_fp32(tiny_base, data, tmp_path):  # noqa: F811
    """--fsdp --bf16: bf16 all-gathers and compute, fp32 shards updated; the adapter is fp32 and within the bf16
    tolerance of the fp32 one-process run (6 steps)."""
    settings = {**SETTINGS, "max_steps": 6}
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "loraplex", "train", "--fsdp", "--bf16",
           "--base", str(tiny_base), "--out", str(tmp_path / "bf16"), "--batch-size", "4", "--data", str(data["a"]),
           *flags(settings)]
    run = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ref = train(TrainConfig(base=str(tiny_base), data=str(data["a"]), out=tmp_path / "fp32", batch_size=8,
                            progress=False, **settings))
    finish(run)
    got = tensors(tmp_path / "bf16")
    assert {t.dtype for t in got.values()} == {torch.float32}
    atol, rtol = tolerance(torch.bfloat16)
    for k, t in tensors(ref.out).items():
        torch.testing.assert_close(got[k], t, atol=atol, rtol=rtol)
    rows = metrics(tmp_path / "bf16")
    assert rows[0]["eval_loss"] != metrics(ref.out)[0]["eval_loss"]  # computed in bf16, not fp32
    assert rows[0]["eval_loss"] == pytest.approx(metrics(ref.out)[0]["eval_loss"], rel=rtol, abs=atol)


def test_fsdp_over_an_nf4_base_equals_one_process(tiny_base, data, tmp_path):  # noqa: F811
    """QLoRA under FSDP: the NF4 weights are buffers (replicated), the float parameters and adapters sharded;
    the adapter equals the one-process QLoRA run with the same global batch within fp32 tolerance."""
    settings = {**SETTINGS, "max_steps": 6, "quantize": "nf4"}
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "loraplex", "train", "--fsdp",
           "--base", str(tiny_base), "--out", str(tmp_path / "fsdp"), "--batch-size", "4", "--data", str(data["a"]),
           *flags(settings)]
    run = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ref = train(TrainConfig(base=str(tiny_base), data=str(data["a"]), out=tmp_path / "one", batch_size=8,
                            progress=False, **settings))
    finish(run)
    assert_same(tensors(tmp_path / "fsdp"), tensors(ref.out), exact=False)


WORKER = '''
import pathlib, sys, torch, torch.nn as nn
from loraplex import LoraConfig, inject
from loraplex.models import load_base
from loraplex.train import fsdp
from loraplex.train.distributed import init_distributed, shutdown
class Root(nn.Module):  # fully_shard needs a module with a forward
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(ids)


info = init_distributed("cpu")
model, tokenizer = fsdp.load_base_rank0(sys.argv[1], None, info)
params = list(model.parameters())
assert tokenizer is not None and all(p.is_meta for p in params) == (info.rank > 0), info.rank
inject(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False), "a",
       seed=0 if info.rank == 0 else None)
root = fsdp.shard_from_rank0(Root(model), model, info, bf16=False)
want, _ = load_base(sys.argv[1])  # every rank loads the full base here, to compare with
inject(want, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False), "a", seed=0)
want = Root(want)
for name, p in root.named_parameters():
    assert not p.is_meta and torch.equal(p.full_tensor(), want.get_parameter(name)), name
for name, b in root.named_buffers():
    assert torch.equal(b, want.get_buffer(name)), name
(pathlib.Path(sys.argv[2]) / f"ok{info.rank}").write_text("ok")
gc = __import__("gc"); del root, model; gc.collect(); shutdown(info)
'''


def test_fsdp_loads_the_base_on_rank_0_only_and_broadcasts_its_shards(tiny_base, tmp_path):  # noqa: F811
    """Rank 1 builds the base on the meta device (it reads no weight); after shard_from_rank0 every
    parameter (base and rank 0's adapter init) and buffer (rotary tables) equals the fully loaded model's."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    done = tmp_path / "done"
    done.mkdir()
    run = subprocess.Popen([str(TORCHRUN), "--standalone", "--nproc-per-node", "2", str(script), str(tiny_base),
                            str(done)], env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finish(run)
    # each rank leaves its own file once every check passed (prints to the shared pipe interleave mid-line)
    assert sorted(p.name for p in done.iterdir()) == ["ok0", "ok1"]
