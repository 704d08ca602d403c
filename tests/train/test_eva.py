"""EVA (init_lora_weights="eva", train/eva.py): PEFT 0.21.2 is the oracle. Same model, same batches -> the same
lora_A bit for bit, the same per-layer ranks and alphas (layers left at rank 0 included); the saved adapter
(plain LoRA, init_lora_weights=true) loads in PEFT and loraplex with equal logits; `loraplex train --init eva`."""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import loraplex as lp
from loraplex.cli import main
from loraplex.errors import ConfigError, DataError, UnsupportedFeatureError
from loraplex.functional import tolerance
from loraplex.inject import configs, lora_layers
from loraplex.models import tiny_gpt2, tiny_llama
from loraplex.store import CONFIG_NAME
from loraplex.train import TrainConfig
from loraplex.train.eva import EvaConfig, get_eva_state_dict, inject_eva
from lora_helpers import move_off_init
from train_helpers import (assert_same, crash_at_second_checkpoint_then_resume, data, tensors,  # noqa: F401
                           tiny_base)  # data, tiny_base: fixtures

ATOL, RTOL = tolerance(torch.float32)
QKV_DOWN = ["q_proj", "k_proj", "v_proj", "down_proj"]


def batches(n: int = 6, rows: int = 4, length: int = 16, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Language-model batches with padding (row 0 ends early) and prompt tokens masked in the labels."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 128, (rows, length), generator=g)
        mask = torch.ones_like(ids)
        mask[0, length - 4:] = 0
        labels = ids.clone()
        labels[:, :5] = -100
        labels[mask == 0] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def peft_eva(build, targets, eva: dict, loader, **kw):
    pm = peft.get_peft_model(build(seed=1), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                             init_lora_weights="eva", eva_config=peft.EvaConfig(**eva),
                                                             **kw))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.initialize_lora_eva_weights(pm, loader, show_progress_bar=False)
    return pm


def ours_eva(build, targets, eva: dict, loader, **kw):
    model = build(seed=1)
    inject_eva(model, lp.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="eva", **kw), loader,
               "default", eva_config=EvaConfig(**eva))
    return model


CASES = [  # (model, targets, EvaConfig fields, LoraConfig extras)
    (tiny_llama, QKV_DOWN, dict(rho=2.0, tau=0.9), {}),  # q/k/v share one input (and one PCA)
    (tiny_llama, QKV_DOWN, dict(rho=1.0, tau=0.95), {}),  # no redistribution
    (tiny_llama, QKV_DOWN, dict(rho=3.0, tau=0.95, use_label_mask=False, adjust_scaling_factors=False), {}),  # a rank 0
    (tiny_llama, ["q_proj", "o_proj", "down_proj"], dict(whiten=True, tau=0.9), {}),  # no shared inputs: see below
    (tiny_llama, QKV_DOWN, dict(tau=0.9, label_mask_value=7), dict(rank_pattern={"down_proj": 2}, use_rslora=True)),
    (tiny_gpt2, ["c_attn", "c_fc"], dict(tau=0.9), {}),  # GPT-2 Conv1D
]


@pytest.mark.parametrize("build,targets,eva,kw", CASES)
def test_eva_equals_peft(build, targets, eva, kw):
    """lora_A (and B = 0) equal PEFT's; so do rank_pattern / alpha_pattern and which layers kept an adapter.
    (whiten is compared without shared inputs: PEFT divides a shared PCA's rows once per layer of the group.)"""
    loader = batches()
    pm, model = peft_eva(build, targets, eva, loader, **kw), ours_eva(build, targets, eva, loader, **kw)
    theirs = {k.removeprefix("base_model.model."): v for k, v in pm.state_dict().items() if "lora_" in k}
    ours = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], atol=0, rtol=0, msg=k)
    pc, oc = pm.peft_config["default"], configs(model)["default"]
    assert (oc.rank_pattern, oc.alpha_pattern) == (pc.rank_pattern, pc.alpha_pattern)
    assert sorted(oc.target_modules) == sorted(pc.target_modules)
    assert sum(a.shape[0] for k, a in ours.items() if "lora_A" in k) == sum(
        lp.LoraConfig(r=4, target_modules=targets, **kw).rank_for(k) for k in lp.find_targets(build(), lp.LoraConfig(
            r=4, target_modules=targets, **kw)))  # the rank budget is kept


def test_eva_rank_zero_layer_gets_no_adapter_and_scale_is_kept():
    model = ours_eva(tiny_llama, QKV_DOWN, dict(rho=3.0, tau=0.95, use_label_mask=False), batches())
    cfg = configs(model)["default"]
    wrapped = {k for k, _ in lora_layers(model)}
    assert "model.layers.0.mlp.down_proj" not in wrapped  # rank 0 in this case (as in PEFT)
    for key, layer in lora_layers(model):
        assert layer.scaling["default"] == pytest.approx(8 / 4)  # adjust_scaling_factors: alpha_l / r_l = alpha / r
        assert cfg.rank_for(key) == layer.r["default"]


def test_saved_eva_adapter_loads_in_peft_and_loraplex(tmp_path):
    model = ours_eva(tiny_llama, QKV_DOWN, dict(rho=2.0, tau=0.9), batches())
    ids = batches(n=1, seed=9)[0]["input_ids"]
    torch.testing.assert_close(model(ids).logits, tiny_llama(seed=1)(ids).logits)  # B = 0: a no-op at the start
    move_off_init(model, 5, std=0.05)
    want = model(ids).logits.detach()
    lp.save_adapter(model, "default", tmp_path / "eva")
    raw = json.loads((tmp_path / "eva" / CONFIG_NAME).read_text())
    assert raw["init_lora_weights"] is True and raw["rank_pattern"]
    pm = peft.PeftModel.from_pretrained(tiny_llama(seed=1), tmp_path / "eva").eval()
    torch.testing.assert_close(pm(ids).logits, want, atol=ATOL, rtol=RTOL)
    back = tiny_llama(seed=1)
    lp.load_adapter(back, tmp_path / "eva")
    torch.testing.assert_close(back(ids).logits, want, atol=ATOL, rtol=RTOL)


def test_eva_state_dict_path_equals_the_dataloader_path():
    config = lp.LoraConfig(r=4, lora_alpha=8, target_modules=QKV_DOWN, init_lora_weights="eva")
    state = get_eva_state_dict(tiny_llama(seed=1), batches(), config, EvaConfig(tau=0.9))
    a, b = tiny_llama(seed=1), ours_eva(tiny_llama, QKV_DOWN, dict(tau=0.9), batches())
    inject_eva(a, config, name="default", eva_state_dict=state, eva_config=EvaConfig(tau=0.9))
    for (k, v), (k2, v2) in zip(a.state_dict().items(), b.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


@settings(max_examples=40, deadline=None)
@given(field=st.sampled_from(["rho", "tau", "use_label_mask", "label_mask_value", "whiten", "adjust_scaling_factors"]),
       value=st.one_of(st.floats(allow_nan=True), st.integers(-5, 5), st.booleans(), st.none(), st.text(max_size=2)))
def test_eva_config_refuses_what_it_cannot_honour(field, value):
    """Every EvaConfig field is checked: a value is either accepted with its meaning or refused naming the field."""
    try:
        cfg = EvaConfig(**{field: value})
    except ConfigError as exc:
        assert field in str(exc)
        return
    got = getattr(cfg, field)
    if field == "rho":
        assert got >= 1
    elif field == "tau":
        assert 0 <= got <= 1
    elif field == "label_mask_value":
        assert isinstance(got, int) and not isinstance(got, bool)
    else:
        assert isinstance(got, bool)


def test_eva_refusals():
    eva_cfg = dict(r=4, target_modules=QKV_DOWN, init_lora_weights="eva")
    with pytest.raises(ConfigError, match="init_lora_weights='eva'"):
        inject_eva(tiny_llama(), lp.LoraConfig(r=4, target_modules=QKV_DOWN), batches())
    with pytest.raises(UnsupportedFeatureError, match="Embedding"):
        inject_eva(tiny_llama(), lp.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"],
                                               init_lora_weights="eva"), batches())
    with pytest.raises(ConfigError, match="features"):  # round(r * rho) = 80 > 64 input features
        inject_eva(tiny_llama(), lp.LoraConfig(**{**eva_cfg, "r": 40}), batches())
    with pytest.raises(DataError, match="empty"):
        inject_eva(tiny_llama(), lp.LoraConfig(**eva_cfg), [])
    with pytest.raises(UnsupportedFeatureError, match="use_dora"):
        inject_eva(tiny_llama(), lp.LoraConfig(**eva_cfg, use_dora=True), batches())
    with pytest.raises(UnsupportedFeatureError, match="cannot"):  # plain inject still needs data for EVA
        lp.inject(tiny_llama(), lp.LoraConfig(**eva_cfg))
    with pytest.raises(DataError, match="did not converge within 5 batches"):  # PEFT would loop forever here
        inject_eva(tiny_llama(), lp.LoraConfig(**eva_cfg), batches(), eva_config=EvaConfig(tau=1.0), max_batches=5)
    model, bad = tiny_llama(), {"model.layers.0.self_attn.q_proj": torch.ones(2, 3)}  # (r_l, 3): q_proj takes 64
    with pytest.raises(ConfigError, match="shape"):
        inject_eva(model, lp.LoraConfig(**eva_cfg), eva_state_dict=bad)
    assert not list(lora_layers(model))  # refused before anything changed


def test_train_config_eva_fields_need_init_eva(tmp_path):
    with pytest.raises(ConfigError, match="eva_rho"):
        TrainConfig(base="x", data="a.jsonl", out=tmp_path, eva_rho=3.0)
    with pytest.raises(ConfigError, match="eva_whiten"):
        TrainConfig(base="x", data="a.jsonl", out=tmp_path, init="pissa", eva_whiten=True)
    with pytest.raises(ConfigError, match="use_dora"):
        TrainConfig(base="x", data="a.jsonl", out=tmp_path, init="eva", use_dora=True)
    assert TrainConfig(base="x", data="a.jsonl", out=tmp_path, init="eva", eva_rho=1.5).eva_rho == 1.5


def test_cli_train_init_eva(tiny_base, data, tmp_path):
    """`loraplex train --init eva` starts from the EVA of its own training batches and saves a plain LoRA with the
    per-layer ranks; it reloads in PEFT."""
    out = tmp_path / "eva"
    rc = main(["train", "--base", str(tiny_base), "--data", str(data["a"]), "--out", str(out), "--init", "eva",
               "--eva-rho", "2", "--eva-tau", "0.9", "--no-eva-label-mask", "--targets", "q_proj,v_proj,down_proj",
               "--rank", "4", "--max-steps", "2", "--device", "cpu", "--max-length", "32", "--batch-size", "4"])
    assert rc == 0
    raw = json.loads((out / CONFIG_NAME).read_text())
    assert raw["init_lora_weights"] is True and raw["rank_pattern"]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["config"]["init"] == "eva" and summary["config"]["eva_label_mask"] is False
    peft.PeftModel.from_pretrained(lp.models.load_base(str(tiny_base))[0], out)


def test_eva_run_resumed_after_a_crash_equals_the_uninterrupted_one(tiny_base, data, tmp_path, monkeypatch):
    """A resumed --init eva run continues from the checkpoint's adapter (its per-layer ranks included)."""
    whole, resumed = crash_at_second_checkpoint_then_resume(
        monkeypatch, tiny_base, data["a"], tmp_path, init="eva", eva_tau=0.9, targets=["q_proj", "down_proj"],
        rank=4, save_every=2)
    assert resumed.resumed_from == 2
    assert_same(tensors(whole.out), tensors(resumed.out), exact=True)


def test_init_fields_at_their_defaults_leave_the_resume_identity_as_before(tmp_path):
    """Checkpoints written before the eva_* / loftq_iter fields existed still resume: at their defaults they are
    not part of TrainConfig.identity(); set, they are (a resume with other EVA settings is refused)."""
    plain = TrainConfig(base="x", data="a.jsonl", out=tmp_path).identity()
    assert not any(k.startswith(("eva_", "loftq_")) for k in plain)
    assert TrainConfig(base="x", data="a.jsonl", out=tmp_path, init="eva", eva_rho=1.5).identity()["eva_rho"] == 1.5


@pytest.mark.parametrize("kw", [dict(quantize="nf4"), dict(packing=True, max_length=32),
                                dict(out_per_data=True)])
def test_eva_runs_over_quantized_packed_and_several_adapters(tiny_base, data, tmp_path, kw):
    """EVA reads QuantLinear inputs, packed rows (no attention_mask) and, with --out-per-data, each adapter's own
    batches (the other adapters disabled meanwhile); every adapter is saved with its own ranks."""
    from train_helpers import config

    from loraplex.train import train

    sources = [data["a"], data["b"]] if kw.get("out_per_data") else [data["b"]]
    run = train(config(tiny_base, sources, tmp_path / "run", init="eva", eva_tau=0.9, max_steps=2, rank=2,
                       targets=["q_proj", "down_proj"], **kw))
    for directory in run.adapters.values():
        assert json.loads((directory / CONFIG_NAME).read_text())["rank_pattern"]
    assert all(run.eval_loss_after[n] < run.eval_loss_before[n] for n in run.adapters)
