"""LoRA core invariants: merged == unmerged == merged-then-unloaded, B=0 == base, unmerge restores the base,
weighted mixes, disable, parameter arithmetic, refusals of bad configs."""

from __future__ import annotations

import pytest
import torch

import loraplex as lp
from loraplex.functional import tolerance
from loraplex.layers import ModulesToSave
from loraplex.models import tiny_conv, tiny_gpt2, tiny_llama, tiny_mlp
from loraplex.report import WeightArithmetic

IDS = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(0))

CASES = {
    # name: (model builder, config kwargs, input)
    "llama": (tiny_llama, dict(target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"]), IDS),
    "llama-all-linear-rslora": (tiny_llama, dict(target_modules="all-linear", use_rslora=True), IDS),
    "gpt2": (tiny_gpt2, dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True), IDS),
    "mlp": (tiny_mlp, dict(target_modules=["net.0", "head"]), torch.randn(3, 16, generator=torch.Generator().manual_seed(0))),
    "conv": (tiny_conv, dict(target_modules=["embed", "conv1d", "conv2d", "head"]), IDS),
}


def _out(model, x):
    out = model(x)
    return (out.logits if hasattr(out, "logits") else out).detach()


def _close(a, b, dtype):
    atol, rtol = tolerance(dtype)
    torch.testing.assert_close(a.float(), b.float(), atol=atol * 10, rtol=rtol * 10)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_equals_unmerged_equals_unloaded(case, dtype):
    build, kw, x = CASES[case]
    x = x.to(dtype) if x.is_floating_point() else x
    model = build(seed=1).to(dtype)
    base = _out(model, x)
    lp.inject(model, lp.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kw), "a", seed=3)
    on_the_fly = _out(model, x)
    assert (on_the_fly.float() - base.float()).abs().max() > 1e-3  # the adapter really changes the output
    rep = lp.merge(model, "a")
    assert rep.layers == len(list(lp.lora_layers(model)))
    _close(_out(model, x), on_the_fly, dtype)
    lp.unmerge(model, "a")
    _close(_out(model, x), on_the_fly, dtype)
    lp.merge(model, "a")
    lp.eject(model)
    assert not any(isinstance(m, lp.LoraLayer) for m in model.modules())
    _close(_out(model, x), on_the_fly, dtype)


@pytest.mark.parametrize("case", sorted(CASES))
def test_zero_B_is_the_base(case):
    build, kw, x = CASES[case]
    model = build(seed=2)
    base = _out(model, x)
    lp.inject(model, lp.LoraConfig(r=4, **kw), "a", seed=0)  # default init: B = 0 (A = 0 for embeddings)
    torch.testing.assert_close(_out(model, x), base, atol=0, rtol=0)  # bit for bit: B = 0 adds exact zeros


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unmerge_restores_base_and_exact_restores_bits(dtype):
    model = tiny_llama(seed=4).to(dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lp.inject(model, lp.LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", init_lora_weights=False), "a")
    rep = lp.merge(model, "a")
    un = lp.unmerge(model, "a")
    assert un.max_restore_error == rep.max_restore_error
    lp.eject(model)
    after = model.state_dict()
    err = max((after[k].float() - before[k].float()).abs().max().item() for k in before)
    assert err == pytest.approx(rep.max_restore_error, abs=1e-12)  # the reported error is the real one
    atol, _ = tolerance(dtype)
    assert err <= atol * 10

    model = tiny_llama(seed=4).to(dtype)
    lp.inject(model, lp.LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", init_lora_weights=False), "a")
    assert lp.merge(model, "a", exact=True).max_restore_error == 0.0
    assert lp.unmerge(model, "a").exact
    lp.eject(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_weighted_mix_is_sum_of_weighted_deltas():
    model = tiny_mlp(seed=0)
    x = torch.randn(5, 16)
    base = _out(model, x)
    cfg = lp.LoraConfig(r=2, target_modules=["net.0", "net.2", "head"], init_lora_weights=False)
    lp.inject(model, cfg, "a", seed=1)
    lp.inject(model, cfg, "b", seed=2)
    lp.set_active(model, "a")
    da = _out(model, x) - base
    lp.set_active(model, "b")
    db = _out(model, x) - base
    lp.set_active(model, {"a": 0.7, "b": -0.3})
    # the MLP is not linear end to end, so compare per layer: the head's input is shared
    head = model.head
    h = torch.randn(4, 32)
    want = head.base_layer(h) + 0.7 * head._lora("a", h) - 0.3 * head._lora("b", h)
    torch.testing.assert_close(head(h), want)
    assert lp.active_adapters(model) == [("a", 0.7), ("b", -0.3)]
    assert not torch.allclose(da, db)
    lp.set_active(model, [])
    torch.testing.assert_close(_out(model, x), base)


def test_disable_adapters_gives_base_and_refuses_when_merged():
    model = tiny_llama(seed=0)
    base = _out(model, IDS)
    lp.inject(model, lp.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False), "a")
    with lp.disable_adapters(model):
        torch.testing.assert_close(_out(model, IDS), base, atol=0, rtol=0)  # bit for bit: the bare base runs
    assert not torch.allclose(_out(model, IDS), base)
    lp.merge(model, "a")
    with pytest.raises(lp.MergeStateError, match="unmerge"):
        with lp.disable_adapters(model):
            pass


def test_only_lora_trains_and_eval_never_merges():
    model = tiny_llama(seed=0)
    lp.inject(model, lp.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]), "a")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or ".modules_to_save.a." in n for n in trainable)
    model.eval()
    model.train()
    assert lp.merged_adapters(model) == []


def test_bias_modes_select_trainable_biases():
    model = tiny_gpt2(seed=0)
    lp.inject(model, lp.LoraConfig(r=2, target_modules=["c_attn"], bias="lora_only"), "a")
    biases = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}
    assert biases and all("c_attn.base_layer" in n for n in biases)
    model = tiny_gpt2(seed=0)
    lp.inject(model, lp.LoraConfig(r=2, target_modules=["c_attn"], bias="all"), "a")
    n_bias = sum(1 for n, _ in model.named_parameters() if n.endswith("bias"))
    assert sum(1 for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")) == n_bias


def test_safe_merge_refuses_nonfinite_and_leaves_model_unchanged():
    model = tiny_llama(seed=0)
    lp.inject(model, lp.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False), "a")
    layers = [m for _, m in lp.lora_layers(model)]
    with torch.no_grad():
        layers[-1].lora_B["a"].weight[0, 0] = float("inf")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lp.NonFiniteError, match="NaN/Inf"):
        lp.merge(model, "a")
    assert lp.merged_adapters(model) == []
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_unmerge_refuses_changed_adapter_and_double_merge():
    model = tiny_mlp()
    lp.inject(model, lp.LoraConfig(r=2, target_modules=["head"], init_lora_weights=False), "a")
    lp.merge(model, "a")
    with pytest.raises(lp.MergeStateError, match="already merged"):
        lp.merge(model, "a")
    with torch.no_grad():
        model.head.lora_A["a"].weight.add_(1.0)
    with pytest.raises(lp.MergeStateError, match="changed since"):
        lp.unmerge(model, "a")
    with pytest.raises(lp.MergeStateError, match="not merged"):
        lp.unmerge(tiny_mlp_with("b"), "b")


def tiny_mlp_with(name):
    m = tiny_mlp()
    lp.inject(m, lp.LoraConfig(r=2, target_modules=["head"]), name)
    return m


def test_seed_arithmetic_4096_r8():
    w = WeightArithmetic(4096, 4096, 8)
    assert w.full_finetune_trainable == 16_777_216
    assert w.lora_trainable == 65_536
    assert w.inference_separate == 16_842_752
    assert w.inference_merged == 16_777_216

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4096, 4096, bias=False, device="meta")

    model = One()
    lp.inject(model, lp.LoraConfig(r=8, target_modules=["proj"]), "a")
    rep = lp.parameter_report(model)
    assert rep.trainable == 65_536 and rep.frozen == 16_777_216
    assert rep.inference_params("a") == {"separate": 16_842_752, "merged": 16_777_216}
    assert rep.adapter_bytes["a"] == 65_536 * 4
    assert "65,536" in rep.table()


def test_rank_and_alpha_patterns_apply_per_module():
    model = tiny_llama()
    cfg = lp.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2},
                        alpha_pattern={r"layers\.1\.self_attn\.q_proj": 32})
    lp.inject(model, cfg, "a")
    attn0, attn1 = model.model.layers[0].self_attn, model.model.layers[1].self_attn
    assert attn0.v_proj.r["a"] == 2 and attn0.q_proj.r["a"] == 4
    assert attn0.q_proj.scaling["a"] == 2.0 and attn1.q_proj.scaling["a"] == 8.0
    assert attn0.v_proj.scaling["a"] == 4.0


def test_layers_to_transform_and_exclude():
    model = tiny_llama()
    targets = lp.inject(model, lp.LoraConfig(r=2, target_modules=["q_proj", "k_proj"], layers_to_transform=[1],
                                             exclude_modules=["model.layers.1.self_attn.k_proj"]), "a")
    assert targets == ["model.layers.1.self_attn.q_proj"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(r=0, target_modules=["q"]), "positive integer, got 0"),
    (dict(r=4, lora_alpha=-1, target_modules=["q"]), "positive finite number, got -1"),
    (dict(r=4, lora_dropout=1.5, target_modules=["q"]), r"\[0, 1\), got 1.5"),
    (dict(r=4, target_modules=None), "target_modules is required"),
    (dict(r=4, target_modules="(", ), "not a valid regular expression"),
    (dict(r=4, target_modules=["q"], bias="some"), "bias must be one of"),
    (dict(r=4, target_modules=["q"], rank_pattern={"v": 0}), r"rank_pattern\['v'\]"),
    (dict(r=4, target_modules=["q"], layers_to_transform=[-1]), "layers_to_transform"),
    (dict(r=4, target_modules=["q"], init_lora_weights="loftq"), "loftq"),
    (dict(r=4, target_modules=["q"], layers_pattern="layers"), "set layers_to_transform too"),
    (dict(r=4, target_modules="q", layers_pattern="layers"), "need target_modules as a list"),
    (dict(r=4, target_modules=["q"], rank_pattern=["q"]), "rank_pattern must be a mapping"),
    (dict(r=4, target_modules=["q"], use_rslora="yes"), "use_rslora must be true or false"),
    (dict(r=4, target_modules=["q"], task_type="CAUSAL"), "task_type must be one of"),
    (dict(r=4, target_modules=["q"], base_model_name_or_path=3), "base_model_name_or_path must be a string"),
])
def test_config_validation_names_the_bad_value(kwargs, match):
    with pytest.raises((lp.ConfigError, lp.UnsupportedFeatureError), match=match):
        lp.LoraConfig(**kwargs)


def test_injection_refusals():
    model = tiny_llama()
    with pytest.raises(lp.TargetNotFoundError, match="nope"):
        lp.inject(model, lp.LoraConfig(r=2, target_modules=["q_proj", "nope"]), "a")
    assert not lp.configs(model) and not list(lp.lora_layers(model))
    with pytest.raises(lp.UnsupportedModuleError, match="LlamaRMSNorm"):
        lp.inject(model, lp.LoraConfig(r=2, target_modules=["input_layernorm"]), "a")
    lp.inject(model, lp.LoraConfig(r=2, target_modules=["q_proj"]), "a")
    with pytest.raises(lp.AdapterExistsError):
        lp.inject(model, lp.LoraConfig(r=2, target_modules=["q_proj"]), "a")
    with pytest.raises(lp.ConfigError, match="adapter name"):
        lp.inject(model, lp.LoraConfig(r=2, target_modules=["q_proj"]), "../x")
    with pytest.raises(lp.AdapterNotFoundError, match="'zz'"):
        lp.set_active(model, "zz")


def test_remove_adapter_unwraps():
    model = tiny_llama()
    base = _out(model, IDS)
    lp.inject(model, lp.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), "a")
    lp.inject(model, lp.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False), "b")
    lp.remove_adapter(model, "b")
    lp.remove_adapter(model, "a")
    assert not list(lp.lora_layers(model))
    torch.testing.assert_close(_out(model, IDS), base, atol=0, rtol=0)  # bit for bit: the base modules are back


@pytest.mark.parametrize("case", ["llama", "gpt2", "conv"])
def test_route_rows_equals_each_row_alone_and_trains(case):
    build, kw, x = CASES[case]
    model = build(seed=0)
    cfg = lp.LoraConfig(r=2, init_lora_weights=False, **kw)
    for name, seed in (("a", 1), ("b", 2)):
        lp.inject(model, cfg, name, seed=seed)
    xs = torch.cat([x, x.flip(0)], 0)  # 4 rows
    assignment = ["b", None, "a", "b"]
    with lp.route_rows(model, assignment):
        routed = _out(model, xs)
    for row, name in enumerate(assignment):
        if name is None:
            with lp.disable_adapters(model):
                alone = _out(model, xs[row:row + 1])
        else:
            lp.set_active(model, name)
            alone = _out(model, xs[row:row + 1])
        torch.testing.assert_close(routed[row:row + 1], alone, atol=tolerance(torch.float32)[0],
                                   rtol=tolerance(torch.float32)[1])
    # gradients reach exactly the adapters that served some row
    lp.freeze_base(model, None)
    for _, layer in lp.lora_layers(model):
        for n in ("a", "b"):
            for t in layer.adapter_tensors(n):
                t.requires_grad_(True)
    with lp.route_rows(model, ["a", None, "a", None]):
        out = model(xs)
        (out.logits if hasattr(out, "logits") else out).sum().backward()
    grads = {n: sum(float(t.grad.abs().sum()) for _, l in lp.lora_layers(model) for t in l.adapter_tensors(n)
                    if t.grad is not None) for n in ("a", "b")}
    assert grads["a"] > 0 and grads["b"] == 0


@pytest.mark.parametrize("case", sorted(CASES))
def test_new_wrappers_take_the_models_train_eval_mode(case):
    """inject() into an eval model gives eval-mode wrappers (dropout off: repeatable outputs); train() turns the
    dropout on; injecting into a training model gives training wrappers (as the modules they wrap)."""
    build, kw, x = CASES[case]
    model = build(seed=0)
    kw = kw | {"lora_dropout": 0.5, "init_lora_weights": False}
    lp.inject(model, lp.LoraConfig(r=4, **kw), "a", seed=1)
    assert not any(m.training for m in model.modules())
    assert torch.equal(_out(model, x), _out(model, x))
    model.train()
    assert not torch.equal(_out(model, x), _out(model, x))
    lp.inject(model, lp.LoraConfig(r=2, **kw), "b", seed=2)
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("case", sorted(CASES))
def test_adapter_shapes_are_the_created_shapes(case):
    build, kw, _ = CASES[case]
    model = build(seed=0)
    lp.inject(model, lp.LoraConfig(r=3, **kw), "a")
    for _, layer in lp.lora_layers(model):
        assert layer.adapter_shapes(3) == tuple(tuple(t.shape) for t in layer.adapter_tensors("a"))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(target_modules=["q_proj"], modules_to_save=["j"]), lp.ConfigError, "either adapted or copied"),
    (dict(target_modules=["q_proj"], modules_to_save=["nope"]), lp.TargetNotFoundError, "nope"),
    (dict(target_modules=["q_proj", "input_layernorm"]), lp.UnsupportedModuleError, "LlamaRMSNorm"),
])
def test_refused_injection_leaves_the_model_untouched(kwargs, error, match):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        lp.inject(model, lp.LoraConfig(r=2, **kwargs), "a")
    assert not lp.configs(model) and not any(isinstance(m, (lp.LoraLayer, ModulesToSave)) for m in model.modules())
    assert model.state_dict().keys() == before.keys()
