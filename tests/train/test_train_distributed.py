"""Data-parallel training: `torchrun --nproc-per-node 2 -m loraplex train` (gloo, 2 CPU processes) gives the
adapter one process gives with the same global batch, within fp32 tolerance (only the summation order of
the gradients differs). The data leaves rank 1 an empty slice in the last batch of each epoch (18 training
rows, global micro-batch 8), and grad_accum=2 exercises DDP's no_sync."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from loraplex.functional import tolerance
from loraplex.train import TrainConfig, train

from train_helpers import TORCHRUN, assert_same, data, flags, subprocess_env, tensors, tiny_base  # noqa: F401  (fixtures)

COMMON = dict(max_length=64, eval_split=0.25, lr=1e-2, epochs=2, grad_accum=2, seed=3, dropout=0.0, device="cpu",
              max_grad_norm=0.5)


@pytest.mark.parametrize("per_data", [False, True], ids=["one-adapter", "two-adapters-one-pass"])
def test_torchrun_two_processes_equal_one_process(tiny_base, data, tmp_path, per_data):  # noqa: F811
    sources = [data["a"], data["b"]] if per_data else [data["a"]]
    out = tmp_path / "ddp"
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "loraplex", "train",
           "--base", str(tiny_base), "--out", str(out), "--batch-size", "4", *flags(COMMON)]
    for s in sources:
        cmd += ["--data", str(s)]
    if per_data:
        cmd.append("--out-per-data")
    run = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:  # the one-process reference trains here meanwhile
        one = train(TrainConfig(base=str(tiny_base), data=[str(s) for s in sources], out=tmp_path / "one",
                                batch_size=8, out_per_data=per_data, progress=False, **COMMON))
        stdout, stderr = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, stdout[-2000:] + stderr[-3000:]
    assert "processes         2" in stdout and stdout.count("eval before") == 1  # only rank 0 reports
    names = ["a", "b"] if per_data else ["default"]
    for name in names:
        where = (lambda d: d / name) if per_data else (lambda d: d)
        assert_same(tensors(where(out)), tensors(where(one.out)), exact=False)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == one.steps
    atol, rtol = tolerance(torch.float32)
    ddp_rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    one_rows = [json.loads(line) for line in (one.out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["adapter"]) for r in ddp_rows] == [(r["step"], r["adapter"]) for r in one_rows]
    for a, b in zip(ddp_rows, one_rows):
        for key in ("loss", "eval_loss", "tokens"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=rtol * 10, abs=atol), (key, a, b)
