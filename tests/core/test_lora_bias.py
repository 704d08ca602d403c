"""lora_bias (PEFT's LoRA-B bias: y = base(x) + scale * (B A x + b)): PEFT is the oracle for files, logits,
gradients and merged weights both ways; merge/unmerge restores the base bias; where it is not implemented
(embeddings, DoRA, residual inits, merging inside the multi-adapter runtime) it is refused with a typed error.
Per-row serving of lora_bias (and modules_to_save) adapters in the runtime and the server: test_variant_rows.py."""

from __future__ import annotations

import peft
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import loraplex as lp
from loraplex.functional import tolerance
from loraplex.models import tiny_gpt2, tiny_llama, tiny_mlp
from lora_helpers import move_off_init

IDS = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
X_MLP = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
ATOL, RTOL = tolerance(torch.float32)
CASES = {  # name: (builder, input, config kwargs); tiny_mlp's net.0/head have biases, net.2 none
    "mlp": (tiny_mlp, X_MLP, dict(r=2, lora_alpha=4, target_modules=["net.0", "net.2", "head"])),
    "gpt2-conv1d": (tiny_gpt2, IDS, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
    "llama": (lambda seed: tiny_llama(seed=seed, attention_bias=True, mlp_bias=True), IDS,
              dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], rank_pattern={"down_proj": 2})),
}


def _out(model, x):
    out = model(x)
    return (out.logits if hasattr(out, "logits") else out).detach()


@pytest.mark.parametrize("case", sorted(CASES))
def test_files_logits_and_gradients_equal_peft_both_ways(case, tmp_path):
    build, x, kw = CASES[case]
    pm = peft.get_peft_model(build(seed=1), peft.LoraConfig(lora_bias=True, **kw))
    move_off_init(pm, 7)
    pm.save_pretrained(tmp_path / "p")
    model = build(seed=1)
    lp.load_adapter(model, tmp_path / "p", "p", trainable=True)
    torch.testing.assert_close(_out(model, x), _out(pm, x), atol=ATOL, rtol=RTOL)
    for m in (model, pm):
        out = m(x)
        (out.logits if hasattr(out, "logits") else out).square().sum().backward()
    ours = {k: p.grad for k, p in model.named_parameters() if p.requires_grad}
    theirs = {k.removeprefix("base_model.model.").replace(".default", ".p"): p.grad
              for k, p in pm.named_parameters() if p.requires_grad}
    assert any(k.endswith("lora_B.p.bias") for k in ours) and ours.keys() == theirs.keys()
    for k, g in ours.items():
        torch.testing.assert_close(g, theirs[k], atol=ATOL, rtol=RTOL, msg=k)
    lp.save_adapter(model, "p", tmp_path / "back")
    back = peft.PeftModel.from_pretrained(build(seed=1), tmp_path / "back").eval()
    torch.testing.assert_close(_out(back, x), _out(model, x), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("case", ["mlp", "llama"])
def test_merged_weights_equal_peft_and_unmerge_restores_bit_for_bit(case, tmp_path):
    build, x, kw = CASES[case]
    kw = kw | {"target_modules": ["net.0", "head"]} if case == "mlp" else kw  # net.2 has no bias to merge into
    model = build(seed=1)
    lp.inject(model, lp.LoraConfig(lora_bias=True, **kw), "a")
    move_off_init(model, 7)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    want = _out(model, x)
    lp.save_adapter(model, "a", tmp_path / "a")
    lp.merge(model, "a", exact=True)
    torch.testing.assert_close(_out(model, x), want, atol=ATOL, rtol=RTOL)
    theirs = peft.PeftModel.from_pretrained(build(seed=1), tmp_path / "a").merge_and_unload().state_dict()
    lp.unmerge(model, "a")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    lp.merge(model, "a")
    for k, v in lp.eject(model).state_dict().items():
        torch.testing.assert_close(v, theirs[k], atol=ATOL, rtol=RTOL, msg=k)


@settings(max_examples=25, deadline=None)
@given(fin=st.integers(1, 9), fout=st.integers(1, 9), r=st.integers(1, 4), w1=st.floats(-2, 2), w2=st.floats(-2, 2),
       order=st.booleans(), seed=st.integers(0, 2**16))
def test_two_weighted_bias_adapters_merge_like_on_the_fly_and_unmerge_in_any_order(fin, fout, r, w1, w2, order, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(fin, fout))
    for name in ("a", "b"):
        lp.inject(model, lp.LoraConfig(r=r, target_modules=["0"], lora_bias=True, init_lora_weights=False), name,
                  seed=seed + len(name) + ord(name))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, fin)
    lp.set_active(model, {"a": w1, "b": w2})
    want = _out(model, x)
    lp.merge(model, "a", w1)
    lp.merge(model, "b", w2)
    torch.testing.assert_close(_out(model, x), want, atol=10 * ATOL, rtol=10 * RTOL)  # merged: 10x, as test_core's
    for name in ("a", "b") if order else ("b", "a"):
        lp.unmerge(model, name)
    torch.testing.assert_close(model[0].base_layer.bias, base["0.base_layer.bias"], atol=ATOL, rtol=RTOL)


def test_refusals_are_typed_and_change_nothing(tmp_path):
    with pytest.raises(lp.UnsupportedFeatureError, match="lora_bias=true with use_dora"):
        lp.LoraConfig(r=2, target_modules=["q_proj"], lora_bias=True, use_dora=True)
    with pytest.raises(lp.UnsupportedFeatureError, match="pissa"):
        lp.LoraConfig(r=2, target_modules=["q_proj"], lora_bias=True, init_lora_weights="pissa")
    model = tiny_llama(seed=1)
    with pytest.raises(lp.UnsupportedFeatureError, match="Linear and GPT-2 Conv1D layers only, not Embedding"):
        lp.inject(model, lp.LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"], lora_bias=True), "a")
    assert not list(lp.lora_layers(model))
    mlp = tiny_mlp(seed=1)
    lp.inject(mlp, lp.LoraConfig(r=2, target_modules=["net.2"], lora_bias=True, init_lora_weights=False), "a")
    with pytest.raises(lp.UnsupportedFeatureError, match="no bias to merge it into"):
        lp.merge(mlp, "a")


@pytest.mark.parametrize("fields, match", [
    (dict(target_modules=["q_proj"], bias="lora_only"), "base_layer.bias|bias training"),
])
def test_runtime_and_server_refuse_what_has_no_row_wise_form_with_a_typed_error(fields, match, tmp_path):
    """The multi-adapter runtime and the server serve LoRA of linear and embedding layers, LoRA-B biases and
    modules_to_save copies per row (tests/runtime/test_embedding_rows.py, tests/core/test_variant_rows.py); trained
    base biases (bias="lora_only"/"all": they change the base every row shares) have no per-row form there:
    refused (UnsupportedFeatureError), nothing kept."""
    from loraplex.runtime import MultiLoraModel
    from loraplex.runtime.slots import pool_tensors

    model = tiny_llama(seed=1, attention_bias=True)
    lp.inject(model, lp.LoraConfig(r=2, init_lora_weights=False, **fields), "a")
    lp.save_adapter(model, "a", tmp_path / "a")
    engine = MultiLoraModel(tiny_llama(seed=1, attention_bias=True))
    with pytest.raises(lp.UnsupportedFeatureError, match=match):
        engine.load("a", tmp_path / "a")
    assert engine.stats.adapters == 0
    layers = {f"model.layers.{i}.self_attn.q_proj": (64, 64) for i in range(2)}
    with pytest.raises(lp.UnsupportedFeatureError, match=match):
        pool_tensors(lp.read_adapter(tmp_path / "a"), layers)


def test_a_config_with_lora_bias_but_no_bias_tensors_is_refused(tmp_path):
    import json

    from loraplex.store import CONFIG_NAME

    model = tiny_llama(seed=1)
    lp.inject(model, lp.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), "a")
    lp.save_adapter(model, "a", tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    (tmp_path / "a" / CONFIG_NAME).write_text(json.dumps(cfg | {"lora_bias": True}))
    with pytest.raises(lp.AdapterFileError, match="lora_B.bias"):
        lp.load_adapter(tiny_llama(seed=1), tmp_path / "a")
