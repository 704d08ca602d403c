"""LoRA over a quantized base (quant/lora.py), the merge strategies, the comparison and the CLI.

References are the obvious float computations: dequantize the base, then apply LoRA / quantize the merged
float weight with the scheme's own quantizer (tests/quant/test_quant.py checks those against element-wise loops).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import loraplex as lp
from loraplex import models
from loraplex.cli import main
from loraplex.errors import BaseMismatchError, ConfigError, MergeStateError, QuantConfigError
from loraplex.functional import tolerance
from loraplex.layers import lora_layer_for
from loraplex.quant import QuantLinear, QuantSpec, load_quantized, quantize_model
from loraplex.quant.compare import compare_merge_strategies, plant_random_adapter, random_probe_ids
from loraplex.quant.lora import LoraQuantLinear, QuantizedMergeWarning, merge_quantized, set_merge_strategy

SCHEMES = [("int8", False), ("nf4", False), ("nf4", True)]
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype = torch.float32) -> None:
    atol, rtol = tolerance(dtype)
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


def quant_layer(scheme: str, dq: bool, *, keep_original: bool = True, init=False, seed: int = 0) -> LoraQuantLinear:
    """A LoraQuantLinear over a random 96 -> 40 Linear with bias, adapter "a" of rank 4."""
    torch.manual_seed(seed)
    linear = nn.Linear(96, 40)
    q = QuantLinear.from_linear(linear, scheme, double_quant=dq, keep_original=keep_original)
    layer = lora_layer_for(q)
    layer.add_adapter("a", 4, 8.0, init=init, generator=gen(seed + 1))
    layer.active = [("a", 1.0)]
    return layer


def packed(layer: LoraQuantLinear) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in layer.base_layer.quantized_weight().tensors().items()}


def assert_packed_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def dequantized_twin(quantized: nn.Module, float_model: nn.Module) -> nn.Module:
    """`float_model` (same architecture, float) with every weight that is a QuantLinear in `quantized` set to
    deQ(W_q): the dequantize-then-float reference of the quantized model. Returns `float_model`."""
    with torch.no_grad():
        for key, q in quantized.named_modules():
            if isinstance(q, QuantLinear):
                base = float_model.get_submodule(key)
                w = q.dequantize()  # (out, in)
                base.weight.copy_(w if isinstance(base, nn.Linear) else w.T)  # GPT-2 Conv1D stores (in, out)
    return float_model


# -- the layer ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme,dq", SCHEMES)
def test_forward_equals_dequantized_base_plus_lora(scheme, dq):
    layer = quant_layer(scheme, dq)
    assert isinstance(layer, LoraQuantLinear) and (layer.in_features, layer.out_features) == (96, 40)
    x = torch.randn(3, 5, 96, generator=gen(7))
    a, b = layer.adapter_tensors("a")
    assert a.dtype == b.dtype == torch.float32  # the adapter stays full precision
    w = layer.base_layer.dequantize()  # (out, in)
    want = F.linear(x, w, layer.base_layer.bias) + layer.scaling["a"] * (x @ a.T) @ b.T
    assert_close(layer(x), want)


@pytest.mark.parametrize("scheme,dq", SCHEMES)
def test_b_zero_gives_exactly_the_quantized_base(scheme, dq):
    layer = quant_layer(scheme, dq, init=True)  # B = 0
    x = torch.randn(4, 96, generator=gen(8))
    assert torch.equal(layer(x), layer.base_layer(x))


def test_bf16_compute_keeps_fp32_adapter():
    q = QuantLinear.from_linear(nn.Linear(64, 32), "nf4", compute_dtype=torch.bfloat16)
    layer = lora_layer_for(q)
    layer.add_adapter("a", 4, 4.0, init=False)
    assert layer.adapter_tensors("a")[0].dtype == torch.float32
    x = torch.randn(2, 64, generator=gen(1))
    a, b = layer.adapter_tensors("a")
    want = q(x) + (x @ a.T) @ b.T
    layer.active = [("a", 1.0)]
    assert_close(layer(x), want)


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_model_equals_dequantized_float_model_with_the_same_adapter(arch):
    """quantized base + LoRA == (float base with W := deQ(W_q)) + LoRA, over a whole model (Linear and Conv1D)."""
    model = getattr(models, arch)(seed=0)
    quantize_model(model, "nf4")
    config = lp.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    ref = dequantized_twin(model, getattr(models, arch)(seed=0))
    targets = lp.inject(model, config, "a", seed=1)
    lp.inject(ref, config, "a", seed=1)
    assert len(targets) == len(lp.find_targets(ref, config)) > 0  # all-linear picks the QuantLinear layers
    assert_close(model(IDS).logits, ref(IDS).logits)


def test_training_reaches_only_a_and_b():
    model = models.tiny_llama(seed=0)
    quantize_model(model, "nf4", double_quant=True)
    lp.inject(model, lp.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False), "a")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    before = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = F.cross_entropy(model(IDS).logits[:, :-1].flatten(0, 1), IDS[:, 1:].flatten())
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in trainable)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    opt.step()
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # packed base and float params unchanged


# -- merging ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme,dq", SCHEMES)
def test_requantize_warns_and_equals_q_of_deq_plus_delta(scheme, dq):
    layer = quant_layer(scheme, dq)
    spec = layer.base_layer.spec
    want = spec.quantize(layer.base_layer.dequantize() + 0.5 * layer.delta("a")).tensors()
    layer.set_merge_strategy("requantize")
    with pytest.warns(QuantizedMergeWarning, match="from_original"):
        layer.merge("a", 0.5)
    assert_packed_equal(packed(layer), want)


@pytest.mark.parametrize("scheme,dq", SCHEMES)
def test_from_original_equals_q_of_original_plus_delta(scheme, dq):
    layer = quant_layer(scheme, dq)
    want = layer.base_layer.spec.quantize(layer.base_layer.original_weight + layer.delta("a")).tensors()
    layer.set_merge_strategy("from_original")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning for this one
        layer.merge("a")
    assert_packed_equal(packed(layer), want)


def test_from_original_stacks_every_merged_adapter():
    layer = quant_layer("nf4", False)
    layer.add_adapter("b", 2, 2.0, init=False, generator=gen(5))
    layer.set_merge_strategy("from_original")
    layer.merge("a")
    layer.merge("b", 0.5)
    w = layer.base_layer.original_weight + layer.delta("a") + 0.5 * layer.delta("b")
    assert_packed_equal(packed(layer), layer.base_layer.spec.quantize(w).tensors())


def test_from_original_without_keep_original_is_a_clear_error():
    model = models.tiny_llama(seed=0)
    quantize_model(model, "int8")  # keep_original defaults to False
    lp.inject(model, lp.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False), "a")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(QuantConfigError, match="keep_original=True"):
        merge_quantized(model, "a", strategy="from_original")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert lp.merged_adapters(model) == []


@pytest.mark.parametrize("strategy", ["requantize", "from_original"])
@pytest.mark.parametrize("scheme,dq", SCHEMES)
def test_unmerge_restores_packed_tensors_bit_exactly(scheme, dq, strategy):
    model = models.tiny_llama(seed=0)
    quantize_model(model, scheme, double_quant=dq, keep_original=True)
    lp.inject(model, lp.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False), "a")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = model(IDS).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", QuantizedMergeWarning)
        rep = merge_quantized(model, "a", strategy=strategy)
    assert rep.quantized_layers == 14 and rep.float_layers == 0 and 0 < rep.delta_error < 1
    assert not torch.equal(model.state_dict()["model.layers.0.mlp.up_proj.base_layer.scale" if scheme == "int8"
                                              else "model.layers.0.mlp.up_proj.base_layer.packed"],
                           before["model.layers.0.mlp.up_proj.base_layer.scale" if scheme == "int8"
                                  else "model.layers.0.mlp.up_proj.base_layer.packed"])  # fmt: skip
    merged_out = model(IDS).logits
    assert (merged_out - out).abs().max() < 0.5  # merged is close to on the fly (not a checked bound)
    report = lp.unmerge(model, "a")
    assert report.exact and report.max_restore_error == 0.0
    after = model.state_dict()
    assert all(v.dtype == after[k].dtype and torch.equal(v, after[k]) for k, v in before.items())
    assert torch.equal(model(IDS).logits, out)


def test_unmerge_out_of_order_replays_the_later_merges():
    layer = quant_layer("nf4", True)
    layer.add_adapter("b", 2, 2.0, init=False, generator=gen(5))
    pristine = packed(layer)
    layer.set_merge_strategy("from_original")
    layer.merge("a")
    with pytest.warns(QuantizedMergeWarning):
        layer.set_merge_strategy("requantize")
        layer.merge("b")
    layer.unmerge("a")  # not on top: restore a's snapshot, merge b again with its own strategy
    assert list(layer.merged) == ["b"] and layer.merged["b"].strategy == "requantize"
    fresh = quant_layer("nf4", True)
    fresh.add_adapter("b", 2, 2.0, init=False, generator=gen(5))
    want = fresh.base_layer.spec.quantize(fresh.base_layer.dequantize() + fresh.delta("b")).tensors()
    assert_packed_equal(packed(layer), want)
    layer.unmerge("b")
    assert_packed_equal(packed(layer), pristine)


def test_strategy_must_be_chosen_and_separate_never_merges():
    model = models.tiny_llama(seed=0)
    quantize_model(model, "nf4", keep_original=True)
    lp.inject(model, lp.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False), "a")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = model(IDS).logits
    with pytest.raises(ConfigError, match="explicit strategy"):
        lp.merge(model, "a")
    with pytest.raises(ConfigError, match="one of"):
        merge_quantized(model, "a", strategy="average")
    rep = merge_quantized(model, "a", strategy="separate")
    assert (rep.quantized_layers, rep.float_layers) == (0, 0)
    assert torch.equal(model(IDS).logits, out)  # still applied on the fly
    with pytest.raises(MergeStateError, match="on the fly"):
        lp.merge_and_unload(model, "a")  # would otherwise drop the adapter silently
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    # the ordinary merge() follows a strategy chosen beforehand
    assert set_merge_strategy(model, "from_original") == 14
    lp.merge(model, "a")
    lp.unmerge(model, "a")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_merge_and_unload_gives_a_quantized_model_that_saves(tmp_path):
    model = models.tiny_llama(seed=0)
    quantize_model(model, "int8", keep_original=True)
    lp.inject(model, lp.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False), "a")
    set_merge_strategy(model, "from_original")
    out = model(IDS).logits
    lp.merge_and_unload(model, "a")
    assert not list(lp.lora_layers(model)) and isinstance(model.model.layers[0].mlp.up_proj, QuantLinear)
    from loraplex.quant import save_quantized

    save_quantized(model, tmp_path / "q")
    loaded = load_quantized(models.tiny_llama(seed=0), tmp_path / "q")
    assert torch.equal(loaded(IDS).logits, model(IDS).logits)
    assert (model(IDS).logits - out).abs().max() < 0.05


# -- adapters move between a quantized base and its float base ---------------------------------------------
def _train_over(scheme: str, dq: bool = False) -> nn.Module:
    model = models.tiny_llama(seed=0)
    quantize_model(model, scheme, double_quant=dq)
    lp.inject(model, lp.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), "a", seed=0)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(IDS).logits[:, :-1].flatten(0, 1), IDS[:, 1:].flatten()).backward()
        opt.step()
    return model


def _roundtrip(model: nn.Module, path, check: bool) -> nn.Module:
    lp.save_adapter(model, "a", path)
    fp = models.tiny_llama(seed=0)
    lp.load_adapter(fp, path, "a", check_base_model=check)
    for (k, layer), (k2, other) in zip(lp.lora_layers(model), lp.lora_layers(fp)):
        assert k == k2
        assert all(torch.equal(x, y) for x, y in zip(layer.adapter_tensors("a"), other.adapter_tensors("a")))
    return fp


def test_adapter_trained_over_int8_loads_on_the_float_base(tmp_path):
    model = _train_over("int8")
    fp = _roundtrip(model, tmp_path / "a", check=True)  # the fingerprint check accepts the int8 base
    assert (fp(IDS).logits - model(IDS).logits).abs().max() < 0.05


@pytest.mark.xfail(strict=True, raises=BaseMismatchError, reason=(
    "identity.check_base: NF4 moves the probed weight values by ~7-9% (relative L2) > PROBE_RTOL = 5%"))
def test_adapter_trained_over_nf4_passes_the_fingerprint_check_on_the_float_base(tmp_path):
    _roundtrip(_train_over("nf4"), tmp_path / "a", check=True)


def test_adapter_trained_over_nf4_loads_on_the_float_base_unchecked(tmp_path):
    model = _train_over("nf4", dq=True)
    fp = _roundtrip(model, tmp_path / "a", check=False)
    assert (fp(IDS).logits - model(IDS).logits).abs().max() < 0.5


# -- the multi-adapter runtime over a quantized base ----------------------------------------------------------
RUNTIME_ADAPTERS = {  # different ranks and target sets, so rows touch different layers
    "a": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "b": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]),
}


@pytest.fixture(scope="module")
def runtime_adapters(tmp_path_factory) -> dict[str, object]:
    """Random adapters (B non-zero) written against the float tiny-llama, in PEFT's layout."""
    root = tmp_path_factory.mktemp("runtime_adapters")
    dirs = {}
    for i, (name, fields) in enumerate(RUNTIME_ADAPTERS.items()):
        model = models.tiny_llama(seed=0)
        lp.inject(model, lp.LoraConfig(init_lora_weights=False, **fields), name, seed=10 + i)
        dirs[name] = lp.save_adapter(model, name, root / name)
    return dirs


def left_padded(rows: int, T: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (rows, T) and a left-padding attention mask (rows, T) with row lengths 1..T."""
    g = gen(seed)
    ids = torch.randint(3, 128, (rows, T), generator=g)
    lengths = torch.randint(1, T + 1, (rows,), generator=g)
    return ids, (torch.arange(T)[None, :] >= (T - lengths)[:, None]).long()


@pytest.mark.parametrize("scheme,dq", SCHEMES)
def test_runtime_serves_adapters_per_row_over_a_quantized_base(runtime_adapters, scheme, dq):
    """MultiLoraModel over a QuantLinear base: each row (one adapter, none, or a weighted mix) equals that
    request run alone on the dequantize-then-float reference with the ordinary LoRA core."""
    from loraplex.errors import UnsupportedFeatureError
    from loraplex.runtime import MultiLoraModel

    base = models.tiny_llama(seed=0)
    quantize_model(base, scheme, double_quant=dq)
    stored = {k: v.clone() for k, v in base.state_dict().items()}
    ref = dequantized_twin(base, models.tiny_llama(seed=0))
    engine = MultiLoraModel(base)
    for name, directory in runtime_adapters.items():
        # int8 passes the base fingerprint check; NF4 moves weights past its 5% (see the xfail test above)
        engine.load(name, directory, check_base_model=scheme == "int8")
        lp.load_adapter(ref, directory, name, activate=False, check_base_model=scheme == "int8")
    assert engine.wrapped and all(isinstance(base.get_submodule(k).base_layer, QuantLinear) for k in engine.wrapped)

    rows = ["a", None, "b", {"a": 0.5, "b": -0.7}, "b", "a"]
    ids, mask = left_padded(len(rows), 7, seed=5)
    got = engine.forward(ids, mask, adapters=rows)
    with torch.no_grad():
        want = []
        for b, spec in enumerate(rows):
            lp.set_active(ref, [] if spec is None else spec)
            want.append(ref(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1]).logits)
    assert_close(got, torch.cat(want))

    # base-only rows are the bare quantized base, bit for bit; serving never touches the packed tensors
    bare = engine.unwrap()
    with torch.no_grad():
        plain = bare(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(plain[1], got[1])
    assert all((plain[b, -1] - got[b, -1]).abs().max() > 1e-3 for b in (0, 2, 3))  # the adapters do act
    assert all(torch.equal(v, bare.state_dict()[k]) for k, v in stored.items())
    engine = MultiLoraModel(bare)
    engine.load("a", runtime_adapters["a"], check_base_model=False)
    with pytest.raises(UnsupportedFeatureError, match="quantized base unmerged"):
        engine.merge("a")


def test_cli_train_quantize_nf4_adapter_reloads_with_the_reported_eval_loss(tmp_path):
    """`loraplex train --quantize nf4` (QLoRA) trains LoRA over NF4 QuantLinear layers; the adapter it writes,
    loaded onto a freshly NF4-quantized base, reproduces the run's eval loss, and the runtime serves it."""
    import json

    from train_helpers import make_tiny_base, write_data  # the tiny Llama + character tokenizer of the train tests

    from loraplex.runtime import MultiLoraModel
    from loraplex.train import Batcher, load_records, row_losses_reference, split, tokenize

    base_dir = make_tiny_base(tmp_path / "base")
    data = write_data(tmp_path / "data")["a"]
    out = tmp_path / "qlora"
    assert main(["train", "--base", str(base_dir), "--data", str(data), "--out", str(out), "--quantize", "nf4",
                 "--max-steps", "6", "--batch-size", "4", "--max-length", "64", "--eval-split", "0.25",
                 "--lr", "1e-2", "--seed", "3", "--no-progress"]) == 0  # fmt: skip
    summary = json.loads((out / "train_summary.json").read_text())["adapters"]["default"]
    assert summary["eval_loss_after"] < summary["eval_loss_before"]

    model, tokenizer = lp.models.load_base(str(base_dir))
    quantize_model(model, "nf4")
    lp.load_adapter(model, out, "q")  # the fingerprint check passes: the same NF4 base the run trained on
    assert all(isinstance(layer, LoraQuantLinear) for _, layer in lp.lora_layers(model))
    _, held_out = split(tokenize(load_records(str(data)), tokenizer, max_length=64), 0.25, 3)
    loss = count = 0.0
    with torch.no_grad():
        for batch in Batcher(held_out, 4, seed=0, shuffle=False, pad_id=tokenizer.pad_token_id):
            loss += float(row_losses_reference(model, batch).sum())
            count += int((batch["labels"][:, 1:] != -100).sum())
    assert loss / count == pytest.approx(summary["eval_loss_after"], rel=1e-4)

    ids = torch.randint(4, 99, (2, 10), generator=gen(0))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    bare = models.load_base(str(base_dir))[0]
    quantize_model(bare, "nf4")
    engine = MultiLoraModel(bare)
    engine.load("q", out)
    assert_close(engine.forward(ids, adapters=["q", "q"]), want)


# -- the comparison -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def planted_adapter(tmp_path_factory):
    """A sizeable random adapter on tiny-llama: ||delta|| = 30% of ||W|| on every linear layer, so that its
    effect on the logits dwarfs NF4's rounding (KL(ref || base) ~ 10x KL(ref || separate), seeds 0-2)."""
    model = models.tiny_llama(seed=0)
    plant_random_adapter(model, "p", r=8, relative_norm=0.3, seed=0)
    path = tmp_path_factory.mktemp("planted") / "p"
    lp.save_adapter(model, "p", path)
    return path


def test_comparison_ranks_separate_above_requantize(planted_adapter):
    base = models.tiny_llama(seed=0)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    ids = random_probe_ids(128, rows=4, seq_len=32)
    res = compare_merge_strategies(base, planted_adapter, ids, ("int8", "nf4"))
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())  # the caller's model untouched
    assert res.get("fp32", "reference").kl == 0.0 and res.get("fp32", "reference").agreement == 1.0
    for scheme in ("int8", "nf4"):
        sep, req, orig, bare = (res.get(scheme, v) for v in ("separate", "requantize", "from_original", "base"))
        # (c) adds one rounding of W; (a) adds a second rounding on top of it (measured margin ~2x, seeds 0-2);
        # (b) vs (c) is one rounding each, so their order is chance and is not asserted
        assert sep.kl < req.kl < bare.kl, scheme
        assert orig.kl < req.kl, scheme
        assert sep.effect_lost == 0.0 and bare.effect_lost == 1.0
        assert scheme in res.recommendations[scheme]
    text = str(res)
    assert "(a) requantize" in text and "recommendation: nf4" in text


# -- CLI ----------------------------------------------------------------------------------------------------
def test_cli_quantize_then_load(tmp_path, capsys):
    assert main(["quantize", "--base", "tiny-llama", "--scheme", "nf4", "--double-quant", "--out",
                 str(tmp_path / "q")]) == 0  # fmt: skip
    assert "load_quantized" in capsys.readouterr().out
    model = load_quantized(models.tiny_llama(seed=0), tmp_path / "q", scheme="nf4", double_quant=True)
    ref = models.tiny_llama(seed=0)
    quantize_model(ref, "nf4", double_quant=True)
    assert torch.equal(model(IDS).logits, ref(IDS).logits)
    assert isinstance(model.model.layers[1].self_attn.o_proj, QuantLinear)
    assert model.model.layers[1].self_attn.o_proj.spec == QuantSpec("nf4", 64, True)


def test_cli_quant_report(planted_adapter, capsys):
    assert main(["quant-report", "--base", "tiny-llama", "--adapter", str(planted_adapter), "--schemes", "int8",
                 "nf4+dq", "--seq-len", "16", "--rows", "2"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "(b) from_original" in out and "recommendation: int8" in out and "recommendation: nf4+dq" in out
    assert main(["quant-report", "--base", "tiny-llama", "--adapter", str(planted_adapter), "--prompts", "x.txt"]) == 1
    assert "no tokenizer" in capsys.readouterr().err
