"""Initializations of new adapters (init_lora_weights): PEFT is the oracle. PiSSA / OLoRA rewrite the base to a
residual in memory and are saved as a plain LoRA on the original base (PEFT's path_initial_model_for_weight_conversion),
which PEFT and loraplex load on an untouched base with the in-memory model's logits and merged weights."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import loraplex as lp
from loraplex.functional import tolerance
from loraplex.models import tiny_gpt2, tiny_llama
from loraplex.store import CONFIG_NAME
from lora_helpers import move_off_init

IDS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
ATOL, RTOL = tolerance(torch.float32)
INITS = ["pissa", "pissa_niter_4", "olora", "orthogonal", "gaussian", True]
KW = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"v_proj": 2},
          alpha_pattern={"down_proj": 3})


def _logits(model, ids=IDS):
    return model(ids).logits.detach()


def _merged_weights(model):
    return {k: v for k, v in model.state_dict().items() if k.endswith("weight")}


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("init", INITS)
def test_trained_adapter_saved_as_plain_lora_loads_in_peft_and_loraplex(init, rslora, use_dora, tmp_path):
    base = tiny_llama(seed=1)
    model = tiny_llama(seed=1)
    lp.inject(model, lp.LoraConfig(init_lora_weights=init, use_rslora=rslora, use_dora=use_dora, **KW), "a", seed=3)
    torch.testing.assert_close(_logits(model), _logits(base), atol=ATOL, rtol=RTOL)  # a no-op at the start
    move_off_init(model, 5, std=0.05)
    want = _logits(model)
    lp.save_adapter(model, "a", tmp_path / "a")
    raw = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    residual = init in ("pissa", "pissa_niter_4", "olora")
    assert raw["init_lora_weights"] == (True if residual else init)
    assert raw["r"] == (8 if residual else 4) and raw["rank_pattern"] == {"v_proj": 4 if residual else 2}
    pm = peft.PeftModel.from_pretrained(tiny_llama(seed=1), tmp_path / "a").eval()
    torch.testing.assert_close(_logits(pm), want, atol=ATOL, rtol=RTOL)
    back = tiny_llama(seed=1)
    lp.load_adapter(back, tmp_path / "a", "a")  # the fingerprint is the original base's
    torch.testing.assert_close(_logits(back), want, atol=ATOL, rtol=RTOL)
    lp.merge(model, "a")
    lp.merge(back, "a")
    ours, theirs = _merged_weights(lp.eject(model)), _merged_weights(pm.merge_and_unload())
    for k, v in _merged_weights(lp.eject(back)).items():
        torch.testing.assert_close(v, theirs[k], atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(ours[k], theirs[k], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_init_equals_peft_and_remove_restores_the_base(init):
    model, pm = tiny_llama(seed=1), peft.get_peft_model(tiny_llama(seed=1), peft.LoraConfig(init_lora_weights=init,
                                                                                             **KW))
    lp.inject(model, lp.LoraConfig(init_lora_weights=init, **KW), "default")
    ours = {k: v for k, v in model.state_dict().items() if "lora_" in k or "base_layer" in k}
    theirs = {k.removeprefix("base_model.model."): v for k, v in pm.state_dict().items()}
    assert ours and set(ours) <= set(theirs)
    for k, v in ours.items():
        torch.testing.assert_close(v, theirs[k], atol=ATOL, rtol=RTOL, msg=k)
    before = tiny_llama(seed=1).state_dict()
    lp.remove_adapter(model, "default")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=ATOL, rtol=RTOL, msg=k)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_peft_converted_residual_adapter_loads_in_loraplex(init, tmp_path):
    """PEFT's own conversion (save the init, train, save with path_initial_model_for_weight_conversion) is read
    by loraplex on the original base with PEFT's in-memory logits."""
    pm = peft.get_peft_model(tiny_llama(seed=1), peft.LoraConfig(init_lora_weights=init, **KW))
    pm.peft_config["default"].init_lora_weights = True  # PEFT's documented recipe: save the initial adapter ...
    pm.save_pretrained(tmp_path / "init")
    pm.peft_config["default"].init_lora_weights = init
    move_off_init(pm, 5, std=0.05)
    want = _logits(pm.eval())
    pm.save_pretrained(tmp_path / "conv", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    model = tiny_llama(seed=1)
    lp.load_adapter(model, tmp_path / "conv", "p")
    torch.testing.assert_close(_logits(model), want, atol=ATOL, rtol=RTOL)


def test_conv1d_base_pissa_round_trips(tmp_path):
    """GPT-2's Conv1D stores W as (in, out): the residual is written back in that layout."""
    ids = IDS % 128
    model = tiny_gpt2(seed=1)
    lp.inject(model, lp.LoraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                                   init_lora_weights="pissa"), "a")
    torch.testing.assert_close(_logits(model, ids), _logits(tiny_gpt2(seed=1), ids), atol=ATOL, rtol=RTOL)
    move_off_init(model, 5, std=0.05)
    want = _logits(model, ids)
    lp.save_adapter(model, "a", tmp_path / "a")
    pm = peft.PeftModel.from_pretrained(tiny_gpt2(seed=1), tmp_path / "a").eval()
    torch.testing.assert_close(_logits(pm, ids), want, atol=ATOL, rtol=RTOL)


def test_orthogonal_starts_as_a_no_op_with_both_factors_nonzero():
    model = tiny_llama(seed=1)
    lp.inject(model, lp.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="orthogonal"), "a", seed=0)
    for _, layer in lp.lora_layers(model):
        a, b = layer.adapter_tensors("a")
        assert a.abs().sum() > 0
        assert b.abs().sum() > 0
        torch.testing.assert_close(b @ a, torch.zeros(b.shape[0], a.shape[1]), atol=ATOL, rtol=0)


def test_seeded_inits_are_reproducible():
    for init in ("orthogonal", "pissa_niter_2"):
        one, two = tiny_llama(seed=1), tiny_llama(seed=1)
        for m in (one, two):
            lp.inject(m, lp.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=init), "a", seed=11)
        assert all(torch.equal(v, two.state_dict()[k]) for k, v in one.state_dict().items())


def test_residual_init_refusals_change_nothing(tmp_path):
    model = tiny_llama(seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lp.UnsupportedFeatureError, match="Linear and GPT-2 Conv1D layers only"):
        lp.inject(model, lp.LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"], init_lora_weights="pissa"), "a")
    with pytest.raises(lp.ConfigError, match="even rank"):
        lp.inject(model, lp.LoraConfig(r=3, target_modules=["q_proj"], init_lora_weights="orthogonal"), "a")
    with pytest.raises(lp.ConfigError, match="exceeds min"):
        lp.inject(model, lp.LoraConfig(r=40, target_modules=["k_proj"], init_lora_weights="olora"), "a")
    assert not list(lp.lora_layers(model)) and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    lp.inject(model, lp.LoraConfig(r=2, target_modules=["q_proj"]), "plain")
    with pytest.raises(lp.UnsupportedFeatureError, match="already sit"):
        lp.inject(model, lp.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa"), "a")
    assert lp.configs(model).keys() == {"plain"}
    lp.inject(model, lp.LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights="olora"), "res")
    with pytest.raises(lp.UnsupportedFeatureError, match="residual init"):
        lp.inject(model, lp.LoraConfig(r=2, target_modules=["v_proj"]), "b")
    with pytest.raises(lp.UnsupportedFeatureError, match="residual"), lp.disable_adapters(model):
        pass
    with pytest.raises(lp.UnsupportedFeatureError, match="residual"), lp.route_rows(model, ["res", None]):
        pass
    with pytest.raises(lp.UnsupportedFeatureError, match="cannot initialize"):
        lp.inject(model, lp.LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights="eva"), "e")


def test_a_file_still_marked_pissa_is_refused(tmp_path):
    """A PiSSA file saved without conversion is relative to the residual base: reading it is refused by name."""
    model = tiny_llama(seed=1)
    lp.inject(model, lp.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), "a")
    lp.save_adapter(model, "a", tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    (tmp_path / "a" / CONFIG_NAME).write_text(json.dumps(cfg | {"init_lora_weights": "pissa_niter_4"}))
    with pytest.raises(lp.UnsupportedFeatureError, match="residual"):
        lp.read_adapter(tmp_path / "a")


@settings(max_examples=25, deadline=None)
@given(fin=st.integers(2, 12), fout=st.integers(2, 12), data=st.data(), init=st.sampled_from(INITS[:3]),
       seed=st.integers(0, 2**16), bias=st.booleans())
def test_residual_file_delta_equals_the_in_memory_update(fin, fout, data, init, seed, bias):
    """W + scale * B' @ A' (the saved plain LoRA on the original W) == W_res + scale * B @ A (in memory)."""
    r = data.draw(st.integers(1, min(fin, fout)))
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(fin, fout, bias=bias))
    w = model[0].weight.detach().clone()
    lp.inject(model, lp.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"], init_lora_weights=init), "a",
              seed=seed)
    move_off_init(model, seed, std=0.05)
    layer = model[0]
    in_memory = layer.base_layer.weight + layer.delta("a")
    sd, cfg = lp.adapter_state_dict(model, "a"), lp.store.saved_config(model, "a")
    a, b = sd["base_model.model.0.lora_A.weight"], sd["base_model.model.0.lora_B.weight"]
    assert a.shape == (2 * r, fin) and cfg.r == 2 * r
    saved = w + lp.functional.delta_weight(a, b, lp.functional.scaling(cfg.r, cfg.lora_alpha))
    torch.testing.assert_close(saved, in_memory.detach(), atol=10 * ATOL, rtol=10 * RTOL)  # W_res + B'A' vs W + BA: 10x


# ---- training ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("init", ["pissa_niter_4", "olora", "orthogonal"])
def test_train_with_init_flag_saves_what_peft_loads(init, tmp_path):
    """`loraplex train --init X`: the loss drops; the file (plain LoRA) gives the same logits in PEFT and loraplex
    on the untouched base."""
    from train_helpers import make_tiny_base, write_data

    from loraplex.cli import main

    base, data = make_tiny_base(tmp_path / "base"), write_data(tmp_path / "data")
    out = tmp_path / "run"
    assert main(["train", "--base", str(base), "--data", str(data["a"]), "--out", str(out), "--init", init,
                 "--rank", "4", "--max-steps", "6", "--batch-size", "4", "--max-length", "64", "--eval-split", "0.25",
                 "--lr", "1e-2", "--no-progress"]) == 0
    summary = json.loads((out / "train_summary.json").read_text())["adapters"]["default"]
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    raw = json.loads((out / CONFIG_NAME).read_text())
    assert raw["r"] == (4 if init == "orthogonal" else 8)
    model, _ = lp.models.load_base(str(base))
    lp.load_adapter(model, out, "t")
    pm = peft.PeftModel.from_pretrained(lp.models.load_base(str(base))[0], out).eval()
    ids = torch.randint(4, 99, (2, 10), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(model.eval(), ids), _logits(pm, ids), atol=ATOL, rtol=RTOL)


def test_train_pissa_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    """A checkpoint holds the converted (rank-2r) file; resuming rebuilds the residual init and continues from
    A = A'[:r], B = B'[:, :r], ending bit-identical to an uninterrupted run."""
    from safetensors.torch import load_file
    from train_helpers import crash_at_second_checkpoint_then_resume, make_tiny_base, write_data

    from loraplex.store import WEIGHTS_NAME

    base, data = make_tiny_base(tmp_path / "base"), write_data(tmp_path / "data")
    whole, resumed = crash_at_second_checkpoint_then_resume(monkeypatch, base, data["a"], tmp_path, init="pissa",
                                                            use_dora=True, save_every=2)
    assert resumed.resumed_from == 2
    a, b = load_file(str(whole.out / WEIGHTS_NAME)), load_file(str(resumed.out / WEIGHTS_NAME))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_config_refuses_inits_it_cannot_honour(tmp_path):
    from loraplex.train import TrainConfig

    with pytest.raises(lp.ConfigError, match="TrainConfig.init"):
        TrainConfig(base="b", data=["d"], out=tmp_path, init="corda")
    with pytest.raises(lp.ConfigError, match="quantize"):  # LoftQ quantizes the base
        TrainConfig(base="b", data=["d"], out=tmp_path, init="loftq")
    with pytest.raises(lp.ConfigError, match="one adapter"):
        TrainConfig(base="b", data=["d1", "d2"], out=tmp_path, init="pissa", out_per_data=True)
    with pytest.raises(lp.ConfigError, match="float base"):
        TrainConfig(base="b", data=["d"], out=tmp_path, init="olora", quantize="nf4")


@pytest.mark.parametrize("value, match", [("lora_ga", "TrainConfig.init"), ("corda", "TrainConfig.init"),
                                          ("PISSA", "TrainConfig.init")])
def test_train_init_flag_refuses_unknown_values_as_usage_errors(value, match, tmp_path, capsys):
    from loraplex.cli import main

    out = tmp_path / "run"
    assert main(["train", "--base", "b", "--data", "d.jsonl", "--out", str(out), "--init", value]) == 2
    assert match in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_bf16_base_residual_round_trip_within_the_bf16_tolerance(init, tmp_path):
    """The residual is computed in fp32 and stored in the base's bf16 (as PEFT does); adapters stay fp32."""
    atol, rtol = tolerance(torch.bfloat16)
    base = tiny_llama(seed=1).to(torch.bfloat16)
    model = tiny_llama(seed=1).to(torch.bfloat16)
    lp.inject(model, lp.LoraConfig(init_lora_weights=init, **KW), "a")
    assert next(iter(lp.lora_layers(model)))[1].adapter_tensors("a")[0].dtype == torch.float32
    torch.testing.assert_close(_logits(model).float(), _logits(base).float(), atol=atol, rtol=rtol)
    move_off_init(model, 5, std=0.05)
    want = _logits(model).float()
    lp.save_adapter(model, "a", tmp_path / "a")
    pm = peft.PeftModel.from_pretrained(tiny_llama(seed=1).to(torch.bfloat16), tmp_path / "a").eval()
    torch.testing.assert_close(_logits(pm).float(), want, atol=atol, rtol=rtol)


def test_fsdp_pissa_equals_one_process(tmp_path):
    """Under FSDP the residual init runs before sharding (every rank the same SVD); the saved plain LoRA equals the
    one-process run with the same global batch within fp32 tolerance."""
    import subprocess

    from train_helpers import FSDP_SETTINGS as SETTINGS
    from train_helpers import finish
    from train_helpers import assert_same, make_tiny_base, subprocess_env, tensors, write_data
    from train_helpers import TORCHRUN, flags

    from loraplex.train import TrainConfig, train

    base, data = make_tiny_base(tmp_path / "base"), write_data(tmp_path / "data")
    settings = {**SETTINGS, "max_steps": 4, "init": "pissa_niter_2"}
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "loraplex", "train", "--fsdp", "--base",
           str(base), "--out", str(tmp_path / "fsdp"), "--batch-size", "4", "--data", str(data["a"]), *flags(settings)]
    run = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ref = train(TrainConfig(base=str(base), data=str(data["a"]), out=tmp_path / "one", batch_size=8, progress=False,
                            **settings))
    finish(run)
    assert json.loads((tmp_path / "fsdp" / CONFIG_NAME).read_text())["r"] == 16
    assert_same(tensors(tmp_path / "fsdp"), tensors(ref.out), exact=False)
