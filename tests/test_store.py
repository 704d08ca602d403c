"""Adapter files: save -> load bit-exact, PEFT interop both ways (PEFT is the oracle), every refusal,
atomic writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import loraplex as lp
from loraplex.models import tiny_conv, tiny_gpt2, tiny_llama
from loraplex.store import CONFIG_NAME, LEGACY_WEIGHTS_NAME, WEIGHTS_NAME, atomic_directory

IDS = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(0))

# name: (builder, loraplex/PEFT config kwargs). Every feature the issue lists appears at least once.
INTEROP = {
    "llama-patterns": (tiny_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"],
                                        rank_pattern={"v_proj": 2}, alpha_pattern={"gate_proj": 32})),
    "llama-rslora-embed-mts": (tiny_llama, dict(r=4, lora_alpha=16, use_rslora=True,
                                                target_modules=["q_proj", "o_proj", "embed_tokens"],
                                                modules_to_save=["lm_head"])),
    "llama-regex-layers": (tiny_llama, dict(r=2, lora_alpha=4, target_modules=r".*\.1\.mlp\.(up|down)_proj")),
    "gpt2-fan-in-fan-out": (tiny_gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                                            fan_in_fan_out=True, bias="lora_only")),
    "gpt2-bias-all": (tiny_gpt2, dict(r=2, lora_alpha=2, target_modules=["c_fc"], fan_in_fan_out=True, bias="all")),
    "conv": (tiny_conv, dict(r=2, lora_alpha=4, target_modules=["embed", "conv1d", "conv2d", "head"])),
}


def _out(model, x=IDS):
    out = model(x)
    return (out.logits if hasattr(out, "logits") else out).detach()


def _randomize(model, name):
    """Give every adapter tensor (and trainable bias / modules_to_save copy) non-trivial values."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("case", sorted(INTEROP))
def test_loraplex_writes_peft_reads(case, tmp_path):
    build, kw = INTEROP[case]
    model = build(seed=1)
    lp.inject(model, lp.LoraConfig(**kw), "a")
    _randomize(model, "a")
    want = _out(model)
    lp.save_adapter(model, "a", tmp_path / "a")
    pm = peft.PeftModel.from_pretrained(build(seed=1), tmp_path / "a").eval()
    torch.testing.assert_close(_out(pm), want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("case", sorted(INTEROP))
def test_peft_writes_loraplex_reads(case, tmp_path):
    build, kw = INTEROP[case]
    pm = peft.get_peft_model(build(seed=1), peft.LoraConfig(**kw))
    _randomize(pm, "default")
    pm.eval()
    want = _out(pm)
    pm.save_pretrained(tmp_path / "p")
    model = build(seed=1)
    lp.load_adapter(model, tmp_path / "p", "p")
    torch.testing.assert_close(_out(model), want, atol=1e-6, rtol=1e-5)


def test_legacy_bin_is_read_with_weights_only(tmp_path):
    pm = peft.get_peft_model(tiny_llama(seed=1), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    _randomize(pm, "default")
    want = _out(pm.eval())
    pm.save_pretrained(tmp_path / "p", safe_serialization=False)
    assert (tmp_path / "p" / LEGACY_WEIGHTS_NAME).exists()
    model = tiny_llama(seed=1)
    lp.load_adapter(model, tmp_path / "p")
    torch.testing.assert_close(_out(model), want, atol=1e-6, rtol=1e-5)


def test_save_load_round_trip_is_bit_exact(tmp_path):
    model = tiny_llama(seed=3).to(torch.bfloat16)
    lp.inject(model, lp.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False), "a")
    saved = lp.save_adapter(model, "a", tmp_path / "a")
    fresh = tiny_llama(seed=3).to(torch.bfloat16)
    loaded = lp.load_adapter(fresh, tmp_path / "a", "b")
    assert loaded.content_hash == saved.content_hash
    for key, t in lp.adapter_state_dict(model, "a").items():
        assert torch.equal(t, lp.adapter_state_dict(fresh, "b")[key]), key
    assert torch.equal(_out(model), _out(fresh))
    # the loraplex facts ride in the safetensors header; PEFT ignores them
    from safetensors import safe_open
    with safe_open(str(tmp_path / "a" / WEIGHTS_NAME), "pt") as fh:
        meta = fh.metadata()
    assert meta["loraplex.content_hash"] == saved.content_hash and "loraplex.version" in meta
    assert json.loads(meta["loraplex.base_fingerprint"])["structure"]


def _saved(tmp_path, **kw):
    model = tiny_llama(seed=1)
    lp.inject(model, lp.LoraConfig(**({"r": 2, "target_modules": ["q_proj", "v_proj"]} | kw)), "a")
    _randomize(model, "a")
    lp.save_adapter(model, "a", tmp_path / "a")
    return tmp_path / "a"


def _assert_untouched(model, before):
    assert not lp.configs(model) and not list(lp.lora_layers(model))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def _refused(path, error, match, model=None, check_base_model=True):
    model = model if model is not None else tiny_llama(seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        lp.load_adapter(model, path, check_base_model=check_base_model)
    _assert_untouched(model, before)


def test_refuses_missing_and_corrupt_files(tmp_path):
    _refused(tmp_path / "nowhere", lp.AdapterFileError, "not a directory")
    d = _saved(tmp_path)
    (d / WEIGHTS_NAME).write_bytes(b"\x00garbage" * 10)
    _refused(d, lp.AdapterFileError, "not a readable safetensors")
    (d / WEIGHTS_NAME).unlink()
    _refused(d, lp.AdapterFileError, "has no adapter_model.safetensors")
    (d / CONFIG_NAME).write_text("{not json")
    _refused(d, lp.AdapterFileError, "not valid JSON")
    (d / CONFIG_NAME).unlink()
    _refused(d, lp.AdapterFileError, "has no adapter_config.json")


def test_refuses_edited_tensors_by_content_hash(tmp_path):
    d = _saved(tmp_path)
    tensors = load_file(str(d / WEIGHTS_NAME))
    from safetensors import safe_open
    with safe_open(str(d / WEIGHTS_NAME), "pt") as fh:
        meta = fh.metadata()
    key = next(iter(tensors))
    tensors[key] = tensors[key] + 1e-3
    save_file(tensors, str(d / WEIGHTS_NAME), metadata=meta)
    _refused(d, lp.AdapterFileError, "content hash")


@pytest.mark.parametrize("key, value, match", [
    ("lora_bias", True, "lora_bias=True"),
    ("layer_replication", [[0, 1]], "layer_replication"),
    ("some_future_knob", 3, "unknown adapter config key 'some_future_knob'"),
    ("peft_type", "IA3", "peft_type 'IA3'"),
])
def test_refuses_config_keys_that_change_semantics(tmp_path, key, value, match):
    d = _saved(tmp_path)
    cfg = json.loads((d / CONFIG_NAME).read_text())
    cfg[key] = value
    (d / CONFIG_NAME).write_text(json.dumps(cfg))
    _refused(d, lp.UnsupportedFeatureError, match)


def test_refuses_shape_mismatch_missing_target_and_other_base(tmp_path):
    d = _saved(tmp_path)
    _refused(d, lp.ShapeMismatchError, r"has shape \(2, 64\), the base needs \(2, 96\)",
             model=tiny_llama(seed=1, hidden_size=96, intermediate_size=128), check_base_model=False)
    _refused(d, lp.TargetNotFoundError, "q_proj", model=tiny_gpt2(seed=1), check_base_model=False)
    _refused(d, lp.BaseMismatchError, "different base model", model=tiny_gpt2(seed=1))
    _refused(d, lp.BaseMismatchError, "different weights", model=tiny_llama(seed=2))
    _refused(d, lp.BaseMismatchError, "different base model", model=tiny_llama(seed=1, num_hidden_layers=3))
    model = tiny_llama(seed=2)
    lp.load_adapter(model, d, check_base_model=False)  # the explicit override works


def test_refuses_nonfinite_weights_and_missing_tensors(tmp_path):
    d = _saved(tmp_path)
    tensors = load_file(str(d / WEIGHTS_NAME))
    key = next(k for k in tensors if "lora_B" in k)
    bad = dict(tensors)
    bad[key] = bad[key].clone()
    bad[key][0, 0] = float("nan")
    save_file(bad, str(d / WEIGHTS_NAME))
    _refused(d, lp.NonFiniteError, "NaN/Inf")
    fewer = {k: v for k, v in tensors.items() if ".layers.1." not in k}
    save_file(fewer, str(d / WEIGHTS_NAME))
    _refused(d, lp.AdapterFileError, "lacks tensors")


def test_bf16_base_keeps_fp32_adapter(tmp_path):
    model = tiny_llama(seed=1).to(torch.bfloat16)
    lp.inject(model, lp.LoraConfig(r=2, target_modules=["q_proj"]), "a")
    a, _ = model.model.layers[0].self_attn.q_proj.adapter_tensors("a")
    assert a.dtype == torch.float32


def test_atomic_directory_keeps_old_content_on_crash(tmp_path):
    target = tmp_path / "adapter"
    with atomic_directory(target) as tmp:
        (tmp / "f").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "f").write_text("half")
            raise RuntimeError("crash mid-save")
    assert (target / "f").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temp litter


def test_crash_mid_save_leaves_last_good_adapter(tmp_path, monkeypatch):
    d = _saved(tmp_path)
    good = lp.read_adapter(d).content_hash
    model = tiny_llama(seed=1)
    lp.inject(model, lp.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False), "a")
    import loraplex.store as store

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(store, "write_json", boom)
    with pytest.raises(OSError, match="disk full"):
        lp.save_adapter(model, "a", d)
    assert lp.read_adapter(d).content_hash == good
