"""--device on train / eval / merge / serve, bf16 training (autocast) and bf16 serving, on every device present.

Parametrized over cpu, cuda and mps; an absent accelerator skips (`-m gpu` selects the CUDA cases: `make
gpu-check`). Accelerator results are checked against the same run on the CPU (the reference), bf16 against
fp32, within functional.TOLERANCES. Everything runs on the tiny random Llama of train_helpers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file

import loraplex as lp
from loraplex import models
from loraplex.cli import main
from loraplex.device import parse_device, present, resolve_device
from loraplex.errors import DeviceError
from loraplex.functional import tolerance
from loraplex.train import TrainConfig, train

from train_helpers import data, tensors, tiny_base  # noqa: F401  (fixtures)

HAS_MPS = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def _device(name: str, here: bool, *marks) -> "pytest.param":
    skip = [] if here else [pytest.mark.skip(reason=f"no {name} device here")]
    return pytest.param(name, marks=[*marks, *skip], id=name)


ACCELERATORS = [_device("cuda", torch.cuda.is_available(), pytest.mark.gpu), _device("mps", HAS_MPS)]
ALL = [pytest.param("cpu", id="cpu"), *ACCELERATORS]
SETTINGS = dict(batch_size=4, max_length=64, eval_split=0.25, lr=1e-2, max_steps=3, seed=3, progress=False)


# ---- the flag ------------------------------------------------------------------------------------------------

@given(st.one_of(st.text(max_size=8), st.sampled_from(["cuda:0", " CUDA ", "cuda:12", "mps", "cuda:", "gpu"])))
def test_parse_device_accepts_exactly_the_grammar(text):
    spec = text.strip().lower()
    ok = spec in ("auto", "cpu", "cuda", "mps") or (spec.startswith("cuda:") and spec[5:].isascii()
                                                    and spec[5:].isdigit())
    if ok:
        assert parse_device(text) == spec
    else:
        with pytest.raises(DeviceError, match="expected auto"):
            parse_device(text)


def test_absent_device_is_refused_naming_the_present_ones(tiny_base, data, tmp_path, capsys):  # noqa: F811
    absent = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(DeviceError, match="present: cpu"):
        resolve_device(absent)
    assert resolve_device("cpu") == torch.device("cpu") and "cpu" in present()
    code = main(["train", "--base", str(tiny_base), "--data", str(data["a"]), "--out", str(tmp_path / "x"),
                 "--device", absent])
    assert code == 1 and "no such device" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # refused before anything was written


# ---- training ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", ACCELERATORS)
def test_train_on_accelerator_equals_cpu(device, tiny_base, data, tmp_path):  # noqa: F811
    """3 fp32 steps on the accelerator give the CPU's adapter and losses (TF32 is off by default)."""
    dev = train(TrainConfig(base=str(tiny_base), data=str(data["a"]), out=tmp_path / "dev", device=device,
                            **SETTINGS))
    cpu = train(TrainConfig(base=str(tiny_base), data=str(data["a"]), out=tmp_path / "cpu", device="cpu",
                            **SETTINGS))
    atol, rtol = tolerance(torch.float32)
    for k, t in tensors(cpu.out).items():
        torch.testing.assert_close(tensors(dev.out)[k], t, atol=atol * 10, rtol=rtol * 10)
    assert dev.eval_loss_after["default"] == pytest.approx(cpu.eval_loss_after["default"], rel=1e-4)
    if device == "cuda":
        assert dev.summary["peak_cuda_bytes"] > 0


@pytest.mark.parametrize("device", ALL)
def test_bf16_training_keeps_fp32_adapters_close_to_fp32(device, tiny_base, data, tmp_path):  # noqa: F811
    """--bf16 (autocast) trains fp32 adapter tensors; losses and adapters stay within the bf16 tolerance."""
    half = train(TrainConfig(base=str(tiny_base), data=str(data["a"]), out=tmp_path / "bf16", device=device,
                             bf16=True, **SETTINGS))
    full = train(TrainConfig(base=str(tiny_base), data=str(data["a"]), out=tmp_path / "fp32", device=device,
                             **SETTINGS))
    atol, rtol = tolerance(torch.bfloat16)
    got, ref = tensors(half.out), tensors(full.out)
    assert {t.dtype for t in got.values()} == {torch.float32}
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=atol, rtol=rtol)
    for when in ("eval_loss_before", "eval_loss_after"):
        a, b = getattr(half, when)["default"], getattr(full, when)["default"]
        assert a == pytest.approx(b, rel=rtol, abs=atol)
    assert a != b  # the bf16 run really computed in bf16


# ---- eval and merge ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def adapter(tiny_base, data, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("adapter") / "a"
    train(TrainConfig(base=str(tiny_base), data=str(data["a"]), out=out, device="cpu", **SETTINGS))
    return out


@pytest.mark.parametrize("device", ACCELERATORS)
def test_eval_and_merge_on_accelerator_equal_cpu(device, adapter, tiny_base, data, tmp_path):  # noqa: F811
    results = {}
    for d in ("cpu", device):
        out = tmp_path / f"eval-{d}.json"
        assert main(["eval", "--base", str(tiny_base), "--adapters", str(adapter), "--data", str(data["a"]),
                     "--metrics", "loss", "--device", d, "--out", str(out)]) == 0
        results[d] = json.loads(out.read_text())
        assert main(["merge", "--base", str(tiny_base), "--adapter", str(adapter), "--out", str(tmp_path / d),
                     "--device", d]) == 0
    assert json.dumps(results["cpu"]).count("loss") == json.dumps(results[device]).count("loss")
    atol, rtol = tolerance(torch.float32)
    merged = {d: load_file(str(tmp_path / d / "model.safetensors")) for d in ("cpu", device)}
    for k, t in merged["cpu"].items():
        torch.testing.assert_close(merged[device][k], t, atol=atol, rtol=rtol)


# ---- serving -------------------------------------------------------------------------------------------------

def _greedy(device: str, dtype: str, adapters_dir: Path, tiny_base: Path) -> tuple[list[int], "object"]:
    pytest.importorskip("fastapi")
    from loraplex.cli.serve import build_server, register
    from loraplex.serve.requests import SamplingParams

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["serve", "--base", str(tiny_base), "--adapters", str(adapters_dir), "--device", device,
                              "--dtype", dtype, "--max-prompt-tokens", "64", "--max-new-tokens", "32"])
    server = build_server(args)
    server.store.load_all()
    result = server.engine.generate([1, 40, 41, 42, 43], "a", SamplingParams(max_tokens=8, temperature=0.0,
                                                                            ignore_eos=True))
    return result.token_ids, server


@pytest.mark.parametrize("device", ALL)
def test_serve_on_device_and_in_bf16(device, adapter, tiny_base, tmp_path):  # noqa: F811
    """`serve --device D` gives the CPU's greedy tokens; `--dtype bf16` serves base and adapters in bf16."""
    folder = tmp_path / "adapters"
    folder.mkdir()
    (folder / "a").symlink_to(adapter, target_is_directory=True)
    ref, _ = _greedy("cpu", "fp32", folder, tiny_base)
    got, server = _greedy(device, "fp32", folder, tiny_base)
    assert server.model.device.type == device and got == ref and len(got) == 8
    half, server = _greedy(device, "bf16", folder, tiny_base)
    assert server.model.dtype == torch.bfloat16 and server.pool.dtype == torch.bfloat16 and len(half) == 8


@pytest.mark.parametrize("device", ACCELERATORS)
def test_seeded_inject_gives_the_same_adapter_on_every_device(device):
    """inject(seed=...) draws from a CPU generator; on an accelerator's base it gives the CPU's tensors."""
    cfg = lp.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    on = {}
    for d in ("cpu", device):
        model = models.tiny_llama(seed=0).to(d)
        lp.inject(model, cfg, "a", seed=7)
        on[d] = lp.adapter_state_dict(model, "a")
    for k, t in on["cpu"].items():
        torch.testing.assert_close(on[device][k], t, atol=0, rtol=0)  # bit for bit: drawn on the CPU, then copied
