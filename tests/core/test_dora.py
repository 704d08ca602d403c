"""DoRA (use_dora): PEFT is the oracle for files, logits, gradients and merged weights, both directions;
merge/unmerge restores the base bit for bit; what is not defined (mixes, scaled merges) is refused."""

from __future__ import annotations

import copy
import json
import shutil

import peft
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import loraplex as lp
from loraplex.functional import tolerance
from loraplex.models import tiny_conv, tiny_gpt2, tiny_llama, tiny_mlp
from loraplex.store import CONFIG_NAME, WEIGHTS_NAME
from lora_helpers import move_off_init

IDS = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(0))
X_MLP = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
ATOL, RTOL = tolerance(torch.float32)

# name: (builder, input, config kwargs). Biases: tiny_mlp net.0/head and the convs have non-zero ones, net.2 none
# (GPT-2's are zero-initialized: the runtime tests below give them values).
CASES = {
    "llama": (tiny_llama, IDS, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                   rank_pattern={"v_proj": 2})),
    "gpt2-conv1d": (tiny_gpt2, IDS, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                                         fan_in_fan_out=True, use_rslora=True)),
    "mlp-bias": (tiny_mlp, X_MLP, dict(r=2, lora_alpha=4, target_modules=["net.0", "net.2", "head"])),
    "conv-embed": (tiny_conv, IDS, dict(r=2, lora_alpha=4, target_modules=["embed", "conv1d", "conv2d", "head"])),
    "llama-embed": (tiny_llama, IDS, dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "o_proj"])),
}


def _out(model, x):
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


def _peft(case, **extra):
    build, _, kw = CASES[case]
    pm = peft.get_peft_model(build(seed=1), peft.LoraConfig(use_dora=True, **kw, **extra))
    move_off_init(pm, 7)
    return pm


def _ours(case, **extra):
    build, _, kw = CASES[case]
    model = build(seed=1)
    lp.inject(model, lp.LoraConfig(use_dora=True, **kw, **extra), "a")
    move_off_init(model, 7)
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_writes_loraplex_reads(case, tmp_path):
    build, x, _ = CASES[case]
    pm = _peft(case).eval()
    want = _out(pm, x).detach()
    pm.save_pretrained(tmp_path / "p")
    model = build(seed=1)
    lp.load_adapter(model, tmp_path / "p", "p")
    torch.testing.assert_close(_out(model, x).detach(), want, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("case", sorted(CASES))
def test_loraplex_writes_peft_reads(case, tmp_path):
    build, x, _ = CASES[case]
    model = _ours(case)
    want = _out(model, x).detach()
    lp.save_adapter(model, "a", tmp_path / "a")
    raw = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    assert raw["use_dora"] is True
    pm = peft.PeftModel.from_pretrained(build(seed=1), tmp_path / "a").eval()
    torch.testing.assert_close(_out(pm, x).detach(), want, atol=ATOL, rtol=RTOL)
    back = build(seed=1)
    lp.load_adapter(back, tmp_path / "a", "a")  # save -> load is bit-exact (tensors; conv kernels may round apart)
    sd = model.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in back.state_dict().items())


@pytest.mark.parametrize("case", sorted(CASES))
def test_fresh_magnitude_and_gradients_equal_peft(case):
    """Init m = ||W||_row (B = 0), and with equal tensors the gradients of A, B and m equal PEFT's (the norm is
    detached); with dropout in training the same random mask reaches both (same RNG order)."""
    build, x, kw = CASES[case]
    pm = peft.get_peft_model(build(seed=1), peft.LoraConfig(use_dora=True, lora_dropout=0.25, **kw))
    model = build(seed=1)
    lp.inject(model, lp.LoraConfig(use_dora=True, lora_dropout=0.25, **kw), "default")
    ours = {n.replace(".default", ""): p for n, p in model.named_parameters() if p.requires_grad}
    theirs = {n.removeprefix("base_model.model.").replace(".default", ""): p
              for n, p in pm.named_parameters() if p.requires_grad}
    assert ours.keys() == theirs.keys()
    for n, p in theirs.items():
        if "magnitude" in n:
            torch.testing.assert_close(ours[n].detach(), p.detach(), atol=ATOL, rtol=RTOL)
    move_off_init(pm, 7)
    with torch.no_grad():
        for n, p in theirs.items():
            ours[n].copy_(p)
    for m in (model, pm):
        m.train()
        torch.manual_seed(5)
        _out(m, x).float().pow(2).mean().backward()
    for n, p in theirs.items():
        torch.testing.assert_close(ours[n].grad, p.grad, atol=ATOL, rtol=RTOL, msg=n)


@pytest.mark.parametrize("case", sorted(CASES))
def test_merged_weights_equal_peft_and_unmerge_restores(case):
    build, x, _ = CASES[case]
    pm = _peft(case).eval()
    want = _out(pm, x).detach()
    model = build(seed=1)
    lp.inject(model, lp.LoraConfig(use_dora=True, **CASES[case][2]), "default")
    sd = {k.removeprefix("base_model.model."): v for k, v in pm.state_dict().items()}
    model.load_state_dict({k: sd[k] for k in model.state_dict()})  # PEFT's in-memory keys are ours
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lp.merge(model, "default", exact=True)
    torch.testing.assert_close(_out(model, x).detach(), want, atol=ATOL, rtol=RTOL)
    merged = pm.merge_and_unload().state_dict()
    for k, v in lp.eject(copy.deepcopy(model)).state_dict().items():
        torch.testing.assert_close(v, merged[k], atol=ATOL, rtol=RTOL, msg=k)
    lp.unmerge(model, "default")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@settings(max_examples=25, deadline=None)
@given(fin=st.integers(1, 12), fout=st.integers(1, 12), r=st.integers(1, 4), bias=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**16))
def test_merge_equals_on_the_fly_and_restores_bit_for_bit(fin, fout, r, bias, dtype, seed):
    """Property: merged output == unmerged output (DoRA forward) and unmerge gives W back bit for bit."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(fin, fout, bias=bias, dtype=dtype))
    lp.inject(net, lp.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"], use_dora=True), "d")
    move_off_init(net, seed)
    x = torch.randn(5, fin, dtype=dtype)
    want = net(x).detach()
    w0 = net[0].base_layer.weight.detach().clone()
    lp.merge(net, "d", exact=True)
    atol, rtol = tolerance(dtype)
    torch.testing.assert_close(net(x).detach(), want, atol=atol, rtol=rtol)
    lp.unmerge(net, "d")
    assert torch.equal(net[0].base_layer.weight, w0)
    torch.testing.assert_close(net(x).detach(), want, atol=atol, rtol=rtol)


@settings(max_examples=10, deadline=None)
@given(rows=st.lists(st.sampled_from([None, "a", "plain"]), min_size=1, max_size=6), seed=st.integers(0, 2**16))
def test_route_rows_with_dora_equals_each_row_alone_with_gradients(rows, seed):
    """Per-row routing (the multi-adapter training path): DoRA, LoRA and base rows in one batch give each row's
    output and, summed, each adapter's gradients (A, B and m) of the rows run alone."""
    model = _ours("mlp-bias")
    lp.inject(model, lp.LoraConfig(r=2, target_modules=["net.0", "head"], init_lora_weights=False), "plain")
    move_off_init(model, seed)
    params = {n: p for n, p in model.named_parameters() if ".a." in n or ".plain." in n}
    for p in params.values():
        p.requires_grad_(True)
    x = torch.randn(len(rows), 16, generator=torch.Generator().manual_seed(seed))
    with lp.route_rows(model, rows):
        routed = model(x)
    if routed.requires_grad:  # (not when every row is the base)
        routed.pow(2).sum().backward()
    got = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in params.items()}
    model.zero_grad()
    alone = []
    for b, name in enumerate(rows):
        lp.set_active(model, [] if name is None else name)
        alone.append(model(x[b:b + 1]))
        if alone[-1].requires_grad:
            alone[-1].pow(2).sum().backward()
    torch.testing.assert_close(routed, torch.cat(alone), atol=ATOL, rtol=RTOL)
    for n, p in params.items():
        torch.testing.assert_close(got[n], p.grad if p.grad is not None else torch.zeros_like(p), atol=ATOL,
                                   rtol=RTOL, msg=n)


def test_refuses_what_dora_does_not_define(tmp_path):
    model = _ours("mlp-bias")
    lp.inject(model, lp.LoraConfig(r=2, target_modules=["net.0"]), "plain")
    with pytest.raises(lp.UnsupportedFeatureError, match="only alone at weight 1.0"):
        lp.set_active(model, {"a": 0.5})
    with pytest.raises(lp.UnsupportedFeatureError, match="only alone at weight 1.0"):
        lp.set_active(model, ["a", "plain"])
    with pytest.raises(lp.UnsupportedFeatureError, match="merges only with weight 1.0"):
        lp.merge(model, "a", 0.5)
    lp.merge(model, "plain")
    with pytest.raises(lp.MergeStateError, match="unmerge them first"):
        lp.merge(model, "a")
    lp.unmerge(model, "plain")
    lp.merge(model, "a")
    with pytest.raises(lp.MergeStateError, match="DoRA adapter 'a' is merged"):
        lp.merge(model, "plain")
    with pytest.raises(lp.ConfigError, match="use_dora must be true or false"):
        lp.LoraConfig(target_modules=["q"], use_dora="yes")


def test_dora_config_without_magnitudes_is_refused(tmp_path):
    """A file whose config says use_dora but that holds no lora_magnitude_vector (or the reverse) is refused."""
    plain = tiny_mlp(seed=1)
    lp.inject(plain, lp.LoraConfig(r=2, target_modules=["net.0"]), "a")
    lp.save_adapter(plain, "a", tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / CONFIG_NAME).read_text())
    (tmp_path / "p" / CONFIG_NAME).write_text(json.dumps(cfg | {"use_dora": True}))
    with pytest.raises(lp.AdapterFileError, match="lacks tensors"):
        lp.load_adapter(tiny_mlp(seed=1), tmp_path / "p", check_base_model=False)
    lp.save_adapter(_ours("mlp-bias"), "a", tmp_path / "d")
    cfg = json.loads((tmp_path / "d" / CONFIG_NAME).read_text())
    (tmp_path / "d" / CONFIG_NAME).write_text(json.dumps(cfg | {"use_dora": False}))
    with pytest.raises(lp.AdapterFileError, match="lora_magnitude_vector"):
        lp.load_adapter(tiny_mlp(seed=1), tmp_path / "d", check_base_model=False)
    assert (tmp_path / "d" / WEIGHTS_NAME).is_file()


def test_train_dora_loss_drops_and_peft_loads_it(tmp_path, capsys):
    """`loraplex train --dora`: the held-out loss drops, the magnitudes train, and PEFT computes what loraplex
    computes with the saved adapter."""
    from loraplex.cli import main
    from train_helpers import make_tiny_base, write_data

    base, data = make_tiny_base(tmp_path / "base"), write_data(tmp_path / "data")
    out = tmp_path / "run"
    assert main(["train", "--base", str(base), "--data", str(data["a"]), "--out", str(out), "--dora",
                 "--dropout", "0.1", "--max-steps", "8", "--batch-size", "4", "--max-length", "64",
                 "--eval-split", "0.25", "--lr", "1e-2", "--no-progress"]) == 0
    summary = json.loads((out / "train_summary.json").read_text())["adapters"]["default"]
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    model, _ = lp.models.load_base(str(base))
    lp.load_adapter(model, out, "t")
    assert lp.configs(model)["t"].use_dora
    layers = [layer for _, layer in lp.lora_layers(model)]
    init = [layer._weight_out_in().norm(dim=1) for layer in layers]
    assert any(not torch.allclose(layer.lora_magnitude_vector["t"].weight, n) for layer, n in zip(layers, init))
    model.eval()
    pm = peft.PeftModel.from_pretrained(lp.models.load_base(str(base))[0], out).eval()
    ids = torch.randint(4, 99, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, pm(ids).logits, atol=ATOL, rtol=RTOL)


# ---- the multi-adapter runtime ------------------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(rows=st.lists(st.sampled_from([-1, 0, 1, 2, 3]), min_size=1, max_size=9),
       strategy=st.sampled_from(["gather", "segment", "auto"]), L=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_plan_rescales_dora_rows_like_the_reference(rows, strategy, L, seed):
    """Ops level: slots 1 and 3 are DoRA ([g; c] per slot), 0 and 2 plain; slot 3 has no LoRA on the layer."""
    import reference_runtime as ref
    from loraplex.runtime import build_plan

    gen = torch.Generator().manual_seed(seed)
    fin, fout = 6, 5
    adapters, x, y = ref.random_layer(gen, len(rows), L, fin, fout)
    gc = {1: torch.randn(2, fout, generator=gen), 3: torch.randn(2, fout, generator=gen)}
    plan = build_plan(lambda s, k: adapters[s], rows, {"l": (fin, fout)}, dtype=torch.float32, strategy=strategy,
                      rescale=lambda s, k: gc[s] if adapters[s] is not None and s in gc else None)
    want = ref.lora_rows_ref(y, x, adapters, rows, rescale=gc)
    torch.testing.assert_close(plan.apply_("l", x, y.clone()), want, atol=ATOL, rtol=RTOL)


def _adapter_dir(build, directory, seed, **fields):
    """A random adapter (non-zero B, magnitudes off their init for DoRA) saved in PEFT's layout."""
    model = build(seed=0)
    lp.inject(model, lp.LoraConfig(init_lora_weights=False, **fields), "x", seed=seed)
    move_off_init(model, seed)
    lp.save_adapter(model, "x", directory)
    return directory


def gpt2_biased(seed: int = 0) -> nn.Module:
    """tiny_gpt2 with non-zero biases (GPT-2 initializes them to 0, which would hide DoRA's bias term)."""
    model = tiny_gpt2(seed=seed)
    gen = torch.Generator().manual_seed(seed + 11)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


RUNTIME = {  # base -> adapter name -> config fields; the GPT-2 Conv1D layers carry biases, Llama's none
    "llama": (tiny_llama, {"d1": dict(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True),
                           "d2": dict(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"], use_dora=True,
                                      rank_pattern={"down_proj": 3}),
                           "plain": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])}),
    "gpt2": (gpt2_biased, {"d1": dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], use_dora=True),
                         "d2": dict(r=2, lora_alpha=2, target_modules=["c_proj"], use_dora=True, use_rslora=True),
                         "plain": dict(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj"])}),
}


@pytest.fixture(scope="module", params=sorted(RUNTIME))
def served(request, tmp_path_factory):
    """(engine, PEFT model holding every adapter, base builder) for one base."""
    from loraplex.runtime import MultiLoraModel

    build, specs = RUNTIME[request.param]
    root = tmp_path_factory.mktemp(request.param)
    dirs = {n: _adapter_dir(build, root / n, i + 1, **f) for i, (n, f) in enumerate(specs.items())}
    eng = MultiLoraModel(build(seed=0), memory_budget_bytes=None)
    names = list(dirs)
    pm = peft.PeftModel.from_pretrained(build(seed=0), dirs[names[0]], adapter_name=names[0]).eval()
    for n in names:
        eng.load(n, dirs[n])
        if n != names[0]:
            pm.load_adapter(dirs[n], adapter_name=n)
    return eng, pm, dirs


def _peft_rows(pm, ids, mask, rows):
    """Each request alone through PEFT (the oracle): its adapter active, or adapters disabled for None."""
    out = []
    with torch.no_grad():
        for b, name in enumerate(rows):
            kw = dict(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1])
            if name is None:
                with pm.disable_adapter():
                    out.append(pm(**kw).logits)
            else:
                pm.set_adapter(name)
                out.append(pm(**kw).logits)
    return torch.cat(out)


def _inputs(B, T, seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (B, T), generator=gen)
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    return ids, (torch.arange(T)[None, :] >= (T - lengths)[:, None]).long()  # left padding


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.sampled_from([None, "d1", "d2", "plain"]), min_size=1, max_size=7), seed=st.integers(0, 2**16))
def test_mixed_batch_of_dora_lora_and_base_rows_equals_each_row_alone_in_peft(served, rows, seed):
    eng, pm, _ = served
    ids, mask = _inputs(len(rows), 5, seed)
    got = eng.forward(ids, mask, adapters=rows)
    torch.testing.assert_close(got, _peft_rows(pm, ids, mask, rows), atol=ATOL, rtol=RTOL)


def test_dora_rows_beside_a_merged_lora_and_after_eviction(served, tmp_path):
    """A merged plain adapter is taken back out of DoRA rows exactly; an evicted DoRA adapter reloads to the
    same outputs; what DoRA leaves undefined in the runtime is refused."""
    from loraplex.runtime import MultiLoraModel

    eng, pm, dirs = served
    rows = ["d1", None, "plain", "d2", "d1"]
    ids, mask = _inputs(len(rows), 4, 3)
    want = _peft_rows(pm, ids, mask, rows)
    eng.merge("plain")
    try:
        torch.testing.assert_close(eng.forward(ids, mask, adapters=rows), want, atol=ATOL, rtol=RTOL)
        eng.load("d2-late", dirs["d2"])  # loaded while "plain" is merged: g comes from the bare base all the same
        late = eng.forward(ids, mask, adapters=["d2-late" if r == "d2" else r for r in rows])
        torch.testing.assert_close(late, want, atol=ATOL, rtol=RTOL)
    finally:
        eng.unmerge()
        if "d2-late" in eng:
            eng.unload("d2-late")
    with pytest.raises(lp.UnsupportedFeatureError, match="DoRA"):
        eng.merge("d1")
    with pytest.raises(lp.UnsupportedFeatureError, match="includes a DoRA adapter"):
        eng.forward(ids[:1], mask[:1], adapters=[{"d1": 0.5}])
    with pytest.raises(lp.UnsupportedFeatureError, match="includes a DoRA adapter"):
        eng.forward(ids[:1], mask[:1], adapters=[{"d1": 1.0, "plain": 1.0}])
    # a budget one byte short of all three: loading "plain" evicts "d1" (least recently used); "d1" reloads
    small = MultiLoraModel(RUNTIME_BASE[type(eng.model).__name__](seed=0),
                           memory_budget_bytes=eng.stats.resident_bytes - 1)
    small.load("d1", dirs["d1"])
    first = small.forward(ids[:2], mask[:2], adapters=rows[:2])  # "d1", None
    torch.testing.assert_close(first, want[:2], atol=ATOL, rtol=RTOL)
    small.load("d2", dirs["d2"])
    small.load("plain", dirs["plain"])
    assert not small.pool.is_resident("d1")
    assert torch.equal(small.forward(ids[:2], mask[:2], adapters=rows[:2]), first)
    assert small.stats.misses > 0


RUNTIME_BASE = {"LlamaForCausalLM": tiny_llama, "GPT2LMHeadModel": gpt2_biased}


def test_combine_refuses_dora_inputs(tmp_path):
    from loraplex.workflows.combine import combine

    dora = _adapter_dir(tiny_mlp, tmp_path / "d", 1, r=2, target_modules=["net.0"], use_dora=True)
    plain = _adapter_dir(tiny_mlp, tmp_path / "p", 2, r=2, target_modules=["net.0"])
    for method in ("cat", "linear", "svd"):
        with pytest.raises(lp.UnsupportedFeatureError, match="cannot combine DoRA adapters"):
            combine([plain, dora], [0.5, 0.5], method)


def test_verify_and_export_a_dora_adapter(tmp_path):
    """`verify` passes every exact variant (merged, on the fly, mixed batch, exported) for a DoRA adapter, and
    the exported merged model computes what PEFT's merge_and_unload computes."""
    from loraplex.workflows.export import merge_into
    from loraplex.workflows.verify import verify

    d = _adapter_dir(tiny_llama, tmp_path / "d", 3, r=4, lora_alpha=8, target_modules="all-linear", use_dora=True)
    report = verify(tiny_llama(seed=0), d, dtypes=("fp32",), variants=("merged", "on_the_fly", "mixed_batch",
                                                                       "exported"))
    assert report.passed and {r.status for r in report.rows} == {"PASS"}, report.rows
    merged = tiny_llama(seed=0)
    merge_into(merged, [d])
    pm = peft.PeftModel.from_pretrained(tiny_llama(seed=0), d).merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, pm(IDS).logits, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_dora_over_a_quantized_base_equals_the_dequantized_float_base(scheme, tmp_path):
    """On the fly over QuantLinear (core and runtime) == DoRA over a float base holding deQ(W_q); merging DoRA into
    a quantized base is refused (it stays on the fly)."""
    from loraplex.quant import quantize_model
    from loraplex.quant.linear import QuantLinear
    from loraplex.runtime import MultiLoraModel

    d = _adapter_dir(tiny_llama, tmp_path / "d", 4, r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"],
                     use_dora=True)
    quant = tiny_llama(seed=0)
    quantize_model(quant, scheme)
    floats = tiny_llama(seed=0)
    with torch.no_grad():
        for name, m in quant.named_modules():
            if isinstance(m, QuantLinear):
                floats.get_submodule(name).weight.copy_(m.quantized_weight().dequantize(torch.float32))
    engine = MultiLoraModel(copy.deepcopy(quant))
    engine.load("d", d, check_base_model=False)
    for model in (quant, floats):
        lp.load_adapter(model, d, "d", check_base_model=False)
    with torch.no_grad():
        want = floats(IDS).logits
        torch.testing.assert_close(quant(IDS).logits, want, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(engine.forward(IDS, adapters=["d", "d"]), want, atol=ATOL, rtol=RTOL)
    with pytest.raises(lp.UnsupportedFeatureError, match="quantized base"):
        lp.merge(quant, "d")
    assert lp.parameter_report(quant).adapter_params["d"] == sum(
        p.numel() for _, layer in lp.lora_layers(quant) for p in layer.adapter_params("d"))


def test_a_refused_dora_merge_changes_no_layer():
    """The DoRA merge rules are checked on every layer before any is merged: a plain adapter merged into the
    LAST layer only makes the DoRA merge fail there, and the earlier layers stay untouched."""
    model = _ours("mlp-bias")
    lp.inject(model, lp.LoraConfig(r=2, target_modules=["head"]), "plain")
    move_off_init(model, 7)
    lp.merge(model, "plain")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lp.MergeStateError, match="unmerge them first"):
        lp.merge(model, "a")
    assert lp.merged_adapters(model) == ["plain"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_server_serves_dora_rows_beside_lora_and_base_rows(tmp_path):
    """The compact decoder's engine: a DoRA adapter's logits equal PEFT's; continuous batching of DoRA, LoRA
    and base requests gives each its solo greedy tokens; a mix with DoRA is refused (400-type) at submit."""
    from loraplex.serve import CompactLlama, Engine, EngineConfig, SamplingParams
    from loraplex.serve.adapters import ServedAdapters
    from loraplex.serve.text import TextCodec
    from loraplex.runtime import AdapterPool

    _adapter_dir(tiny_llama, tmp_path / "dora", 5, r=4, lora_alpha=8, target_modules="all-linear", use_dora=True)
    _adapter_dir(tiny_llama, tmp_path / "plain", 6, r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"])

    def engine():
        hf = tiny_llama(seed=0)
        model = CompactLlama(hf)
        pool = AdapterPool(model.layer_shapes(), dtype=model.dtype)
        store = ServedAdapters(tmp_path, pool, hf, reserved={"base"})
        store.load("dora"), store.load("plain")
        return Engine(model, pool, TextCodec.for_model(None, hf.config), base_ids=("base",),
                      config=EngineConfig(max_batch=4, max_prompt_tokens=32, max_new_tokens=16)), store

    eng, store = engine()
    pm = peft.PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path / "dora").eval()
    plan = eng.pool.plan([eng.pool.slot("dora")])
    with torch.no_grad():
        torch.testing.assert_close(eng.model.logits(IDS[:1], plan), pm(IDS[:1]).logits, atol=ATOL, rtol=RTOL)
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    jobs = [([5, 9, 11], "dora"), ([3, 4], "plain"), ([7, 7, 7, 7], "base"), ([20, 21], "dora")]
    handles = [eng.submit(p, m, greedy) for p, m in jobs]
    while not all(h.done for h in handles):
        eng.step()
    for (p, m), h in zip(jobs, handles):
        assert h.result().token_ids == engine()[0].generate(p, m, greedy).token_ids
    with pytest.raises(lp.UnsupportedFeatureError, match="mixes DoRA"):
        eng.submit([5], "dora:0.5", greedy)
    with pytest.raises(lp.UnsupportedFeatureError, match="mixes DoRA"):
        eng.submit([5], "dora+plain", greedy)
    # a queued mix whose adapter becomes DoRA (replaced) before it starts fails alone; the others run
    mixed, alone = eng.submit([5, 6], "plain:0.5", greedy), eng.submit([5, 6], "dora", greedy)
    shutil.rmtree(tmp_path / "plain")
    shutil.copytree(tmp_path / "dora", tmp_path / "plain")
    store.load("plain", replace=True)
    while not (mixed.done and alone.done):
        eng.step()
    assert mixed.result().finish_reason == "error" and "mixes DoRA" in str(mixed.result().error)
    assert alone.result().finish_reason == "length"


def test_bf16_base_dora_rows_agree_with_the_core_within_bf16_tolerance(tmp_path):
    """A bf16 engine keeps [g; c] in bf16; its DoRA rows agree with the LoRA core over the bf16 base (adapters
    in fp32 there, as in PEFT) within the bf16 tolerance."""
    from loraplex.runtime import MultiLoraModel

    d = _adapter_dir(gpt2_biased, tmp_path / "d", 7, r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                     use_dora=True)
    eng = MultiLoraModel(gpt2_biased(seed=0).to(torch.bfloat16))
    eng.load("d", d, check_base_model=False)
    ref = gpt2_biased(seed=0).to(torch.bfloat16)
    lp.load_adapter(ref, d, "d", check_base_model=False)
    ids, mask = _inputs(3, 5, 2)
    with torch.no_grad():
        want = torch.cat([ref(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1]).logits for b in (0, 1)])
        lp.set_active(ref, [])
        want = torch.cat([want, ref(input_ids=ids[2:], attention_mask=mask[2:]).logits])
    atol, rtol = tolerance(torch.bfloat16)
    torch.testing.assert_close(eng.forward(ids, mask, adapters=["d", "d", None]), want, atol=atol, rtol=rtol)


def test_train_dora_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    """The magnitudes are part of the training state (optimizer moments included): a DoRA run that dies while
    writing its second checkpoint and resumes from the first ends bit-identical to an uninterrupted run."""
    from safetensors.torch import load_file
    from train_helpers import crash_at_second_checkpoint_then_resume, make_tiny_base, write_data

    base, data = make_tiny_base(tmp_path / "base"), write_data(tmp_path / "data")
    whole, resumed = crash_at_second_checkpoint_then_resume(monkeypatch, base, data["a"], tmp_path, use_dora=True,
                                                            dropout=0.1, save_every=2)
    assert resumed.resumed_from == 2
    a, b = load_file(str(whole.out / WEIGHTS_NAME)), load_file(str(resumed.out / WEIGHTS_NAME))
    assert a.keys() == b.keys() and any(k.endswith("lora_magnitude_vector") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
