"""combine / extract: exactness properties, explicit-loop references for ties/dare/magnitude_prune, PEFT as the
oracle for loading, on-the-fly weighted mixes as the oracle for combined deltas, refusals, and the CLI."""

from __future__ import annotations

import errno
import json
import math
from pathlib import Path

import peft
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

import loraplex as lp
from loraplex.cli import main
from loraplex.workflows.combine import METHODS, PRUNING, combine, save_combined
from loraplex.workflows.combine_methods import dare_mask
from loraplex.config import LoraConfig
from loraplex.device import present
from loraplex.errors import (BaseMismatchError, ConfigError, IncompatibleAdaptersError, OutputExistsError,
                             ShapeMismatchError, UnsupportedFeatureError)
from loraplex.workflows.export import merge_into
from loraplex.workflows.extract import extract_lora
from loraplex.functional import tolerance
from loraplex.models import tiny_conv, tiny_gpt2, tiny_llama
from loraplex.store import AdapterFile

IDS = torch.randint(0, 32, (2, 7), generator=torch.Generator().manual_seed(0))
F32 = tolerance(torch.float32)


# -- reference helpers (written out, independent of src) -------------------------------------------------------
def deltas(af: AdapterFile) -> dict[str, torch.Tensor]:
    """{module: scale * B @ A} in float64, LoRA layout flattened to 2-D; scale written out from the config."""
    out = {}
    for key, a in af.tensors.items():
        for sa, sb in ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B")):
            if key.endswith(sa):
                m = key[: -len(sa)]
                b = af.tensors[m + sb]
                r, alpha = af.config.rank_for(m), af.config.alpha_for(m)
                s = alpha / (math.sqrt(r) if af.config.use_rslora else r)
                out[m] = s * b.double().flatten(1) @ a.double().flatten(1)
    return out


def mem_adapter(mods: dict[str, tuple[torch.Tensor, torch.Tensor]], name: str = "mem", **cfg) -> AdapterFile:
    tensors = {}
    for m, (a, b) in mods.items():
        tensors[f"{m}.lora_A.weight"], tensors[f"{m}.lora_B.weight"] = a, b
    cfg.setdefault("target_modules", sorted(mods))
    return AdapterFile(Path(name), LoraConfig(**cfg), tensors, content_hash=name)


def assert_close(got, want, tol=F32, scale=10):
    torch.testing.assert_close(got.double(), want.double(), atol=tol[0] * scale, rtol=tol[1] * scale)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        out = model(IDS)
    return (out.logits if hasattr(out, "logits") else out).detach()


def saved(tmp_path, name, build, seed, **cfg) -> Path:
    model = build(seed=0)
    lp.inject(model, lp.LoraConfig(init_lora_weights=False, **cfg), "a", seed=seed)
    lp.save_adapter(model, "a", tmp_path / name)
    return tmp_path / name


# -- properties (no model) ---------------------------------------------------------------------------------------
@st.composite
def adapter_sets(draw, same_rank=False):
    """1-3 random adapters over two modules of random shapes, with rsLoRA / rank_pattern / alpha_pattern."""
    shapes = {"x.q": (draw(st.integers(1, 6)), draw(st.integers(1, 6))), "x.v": (draw(st.integers(1, 6)), 3)}
    n = draw(st.integers(1, 3))
    common_r = draw(st.integers(1, 4))
    afs = []
    for i in range(n):
        r = common_r if same_rank else draw(st.integers(1, 4))
        rv = r if same_rank else draw(st.integers(1, 4))
        gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
        mods = {m: (torch.randn(rank, i_, generator=gen), torch.randn(o, rank, generator=gen))
                for (m, (o, i_)), rank in zip(shapes.items(), (r, rv))}
        afs.append(mem_adapter(mods, f"ad{i}", r=r, lora_alpha=draw(st.sampled_from([1, 4, 16])),
                               use_rslora=draw(st.booleans()), rank_pattern={} if rv == r else {"v": rv},
                               alpha_pattern=draw(st.sampled_from([{}, {"v": 2.5}]))))
    weight = st.one_of(st.just(0.0), st.floats(0.01, 2), st.floats(-2, -0.01))
    weights = draw(st.lists(weight, min_size=n, max_size=n))
    return afs, weights


@settings(max_examples=40, deadline=None)
@given(adapter_sets())
def test_cat_is_exact_with_rank_sum_and_svd_full_rank_is_exact(case):
    afs, weights = case
    want = {m: sum(w * deltas(af)[m] for af, w in zip(afs, weights)) for m in ("x.q", "x.v")}
    cat = combine(afs, weights, "cat")
    for m in want:
        assert_close(deltas(cat)[m], want[m])
        assert cat.config.rank_for(m) == sum(af.config.rank_for(m) for af in afs)
        assert cat.config.alpha_for(m) == cat.config.rank_for(m) and not cat.config.use_rslora  # scale 1
    svd = combine(afs, weights, "svd", rank=64)  # clamped to min(out, in, sum of ranks): the exact sum
    assert svd.report.max_error < 1e-6
    for m in want:
        assert_close(deltas(svd)[m], want[m])


@settings(max_examples=30, deadline=None)
@given(adapter_sets(same_rank=True))
def test_linear_is_the_documented_factor_sum(case):
    afs, weights = case
    out = combine(afs, weights, "linear")
    for m in ("x.q", "x.v"):
        cs = []
        for af in afs:
            r, alpha = af.config.rank_for(m), af.config.alpha_for(m)
            cs.append(math.sqrt(abs(alpha / (math.sqrt(r) if af.config.use_rslora else r))))
        a = sum(math.sqrt(abs(w)) * c * af.tensors[f"{m}.lora_A.weight"].double() for af, w, c in zip(afs, weights, cs))
        b = sum(math.copysign(math.sqrt(abs(w)) * c, w) * af.tensors[f"{m}.lora_B.weight"].double()
                for af, w, c in zip(afs, weights, cs))
        assert_close(out.tensors[f"{m}.lora_A.weight"], a)
        assert_close(out.tensors[f"{m}.lora_B.weight"], b)
        want = sum(w * deltas(af)[m] for af, w in zip(afs, weights))  # what linear is NOT, in general
        err = ((b @ a - want).norm() / want.norm()).item() if want.norm() > 0 else 0.0
        row = next(r for r in out.report.modules if r.module == m)
        assert row.error == pytest.approx(err, rel=1e-5, abs=1e-6)


def _pair(rank_b=3):
    g = torch.Generator().manual_seed(7)
    a = mem_adapter({"x.q": (torch.randn(3, 5, generator=g), torch.randn(4, 3, generator=g))}, "a", r=3, lora_alpha=6)
    b = mem_adapter({"x.q": (torch.randn(rank_b, 5, generator=g), torch.randn(4, rank_b, generator=g))}, "b",
                    r=rank_b, lora_alpha=2, use_rslora=True)
    return a, b


@pytest.mark.parametrize("method", ["linear", "cat", "svd"])
def test_weights_one_zero_give_the_first_adapter(method):
    a, b = _pair()
    out = combine([a, b], [1.0, 0.0], method)
    assert_close(deltas(out)["x.q"], deltas(a)["x.q"])


@pytest.mark.parametrize("method", METHODS)
def test_weight_minus_one_negates(method):
    a, _ = _pair()
    out = combine([a], [-1.0], method, density=1.0 if method in PRUNING else None)
    assert_close(deltas(out)["x.q"], -deltas(a)["x.q"])
    assert out.report.max_error < 1e-6


def test_svd_reports_the_true_truncation_error():
    a, b = _pair(rank_b=4)
    out = combine([a, b], [0.7, -1.3], "svd", rank=2)
    want = 0.7 * deltas(a)["x.q"] - 1.3 * deltas(b)["x.q"]
    err = ((deltas(out)["x.q"] - want).norm() / want.norm()).item()
    assert out.config.r == 2 and err > 0.01
    assert out.report.max_error == pytest.approx(err, rel=1e-4)
    best = torch.linalg.svdvals(want)  # and it is the best rank-2 approximation (Eckart-Young)
    assert err == pytest.approx((best[2:].pow(2).sum() / best.pow(2).sum()).sqrt().item(), rel=1e-4)


# -- ties / dare / magnitude_prune against explicit loops --------------------------------------------------------
def _topk_loop(d: torch.Tensor, density: float) -> torch.Tensor:
    flat = d.flatten().tolist()
    k = max(1, math.ceil(density * len(flat) - 1e-9))
    keep = sorted(range(len(flat)), key=lambda j: -abs(flat[j]))[:k]
    out = [0.0] * len(flat)
    for j in keep:
        out[j] = flat[j]
    return torch.tensor(out, dtype=torch.float64).view(d.shape)


def _reference(method, ds, ws, density, seed, module):
    kept = []
    for i, (d, w) in enumerate(zip(ds, ws)):
        if method in ("ties", "magnitude_prune"):
            t = _topk_loop(d, density)
        else:
            mask = dare_mask(d.shape, density, seed, module, i)
            t = torch.where(mask, d / density, torch.zeros_like(d))
        kept.append(w * t)
    out = torch.zeros_like(ds[0])
    for e in range(out.numel()):
        vals = [t.flatten()[e].item() for t in kept]
        if method in ("magnitude_prune", "dare_linear"):
            out.view(-1)[e] = sum(vals)
            continue
        sign = 1.0 if sum(vals) >= 0 else -1.0
        agreeing = [v for v in vals if v != 0 and math.copysign(1.0, v) == sign]
        out.view(-1)[e] = sum(agreeing) / len(agreeing) if agreeing else 0.0
    return out


@pytest.mark.parametrize("method", PRUNING)
@pytest.mark.parametrize("density", [0.3, 0.7])
def test_pruning_methods_match_loop_references(method, density):
    g = torch.Generator().manual_seed(3)
    afs = [mem_adapter({"x.q": (torch.randn(2, 5, generator=g), torch.randn(4, 2, generator=g))}, f"a{i}",
                       r=2, lora_alpha=alpha) for i, alpha in enumerate([2, 4, 8])]
    ws = [0.5, -1.0, 0.8]
    out = combine(afs, ws, method, density=density, rank=4, seed=11)  # rank 4 = full: the final SVD is exact
    want = _reference(method, [deltas(af)["x.q"] for af in afs], ws, density, 11, "x.q")
    assert out.report.max_error < 1e-6
    assert_close(deltas(out)["x.q"], want)
    low = combine(afs, ws, method, density=density, rank=1, seed=11)  # and at rank 1 the error is the true one
    assert low.report.max_error == pytest.approx(((deltas(low)["x.q"] - want).norm() / want.norm()).item(), rel=1e-4)


def test_dare_is_seeded_and_keeps_density():
    m1, m2 = dare_mask((200, 300), 0.3, 5, "x.q", 0), dare_mask((200, 300), 0.3, 5, "x.q", 0)
    assert torch.equal(m1, m2) and abs(m1.double().mean().item() - 0.3) < 0.01
    assert not torch.equal(m1, dare_mask((200, 300), 0.3, 6, "x.q", 0))
    assert not torch.equal(m1, dare_mask((200, 300), 0.3, 5, "x.q", 1))
    a, b = _pair()
    r1, r2 = (combine([a, b], [1, 1], "dare_linear", density=0.5, seed=s) for s in (1, 1))
    assert torch.equal(r1.tensors["x.q.lora_A.weight"], r2.tensors["x.q.lora_A.weight"])



@pytest.mark.parametrize("device", present())
@settings(max_examples=20, deadline=None)
@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=3), seed=st.integers(0, 2**31),
       density=st.floats(0.05, 0.95))
def test_dare_mask_is_the_same_on_every_device(device, shape, seed, density):
    """The mask is drawn from the CPU generator and moved: the same seed gives the same mask on any device,
    so a delta living on that device can be multiplied by it."""
    mask = dare_mask(shape, density, seed, "m.q", 1, device)
    assert mask.device == torch.device(device) and mask.shape == tuple(shape)
    assert torch.equal(mask.cpu(), dare_mask(shape, density, seed, "m.q", 1))
    delta = torch.ones(shape, device=device)
    assert torch.equal((delta * mask).cpu(), mask.cpu().float())

# -- on real models: the on-the-fly weighted mix and PEFT as oracles -------------------------------------------
MODELS = {
    "llama": (tiny_llama, ["q_proj", "v_proj", "embed_tokens"]),
    "gpt2": (tiny_gpt2, ["c_attn", "c_fc"]),
    "conv": (tiny_conv, ["embed", "conv1d", "conv2d", "head"]),
}


@pytest.mark.parametrize("case", sorted(MODELS))
@pytest.mark.parametrize("method", ["cat", "svd"])
def test_combined_adapter_equals_the_weighted_mix(tmp_path, case, method):
    build, targets = MODELS[case]
    a = saved(tmp_path, "a", build, 1, r=4, lora_alpha=8, target_modules=targets)
    b = saved(tmp_path, "b", build, 2, r=2, lora_alpha=4, use_rslora=True, target_modules=targets,
              rank_pattern={targets[0]: 3}, alpha_pattern={targets[-1]: 16})
    weights = [0.6, -0.4]
    out = combine([a, b], weights, method, **(dict(rank=64) if method == "svd" else {}))
    mix = build(seed=0)
    lp.load_adapter(mix, a, "a")
    lp.load_adapter(mix, b, "b")
    lp.set_active(mix, {"a": weights[0], "b": weights[1]})  # y = base + sum_i w_i * D_i x, on the fly
    model = build(seed=0)
    lp.load_adapter(model, save_combined(out, tmp_path / "out").path, "c")
    assert_close(logits(model), logits(mix))


def test_peft_loads_combined_adapters_and_merge_matches(tmp_path):
    targets = ["q_proj", "v_proj", "down_proj", "embed_tokens"]
    pm = peft.get_peft_model(tiny_llama(seed=0), peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True,
                             target_modules=targets, init_lora_weights=False, rank_pattern={"down_proj": 2}))
    pm.save_pretrained(tmp_path / "peft_made")  # a PEFT-written input (no loraplex fingerprint)
    a = tmp_path / "peft_made"
    b = saved(tmp_path, "b", tiny_llama, 2, r=3, lora_alpha=5, target_modules=targets, alpha_pattern={"q_proj": 9})
    weights = [0.75, -0.5]
    base = tiny_llama(seed=0)
    merge_into(base, [a, b], weights)  # the reference: W + sum_i w_i D_i
    for method, kw in [("cat", {}), ("svd", dict(rank=7)), ("dare_ties", dict(density=0.5, rank=4))]:
        out = save_combined(combine([a, b], weights, method, **kw), tmp_path / method)
        ours = tiny_llama(seed=0)
        lp.load_adapter(ours, out.path, "c")
        theirs = peft.PeftModel.from_pretrained(tiny_llama(seed=0), out.path).eval()
        assert_close(logits(theirs), logits(ours))
        if method != "dare_ties":  # exact methods: combined-then-merged == each merged with its weight
            merged = lp.merge_and_unload(ours)
            want = base.state_dict()
            for k, v in merged.state_dict().items():
                assert_close(v, want[k])


def test_modules_to_save_copies_are_averaged_or_refused(tmp_path):
    a = saved(tmp_path, "a", tiny_llama, 1, r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    b = saved(tmp_path, "b", tiny_llama, 2, r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    ra, rb = lp.read_adapter(a), lp.read_adapter(b)
    with torch.no_grad():
        ra.tensors["lm_head.weight"] += 1.0
    out = save_combined(combine([ra, rb], [0.25, 0.75], "cat"), tmp_path / "out")
    head = "lm_head.weight"
    assert_close(out.tensors[head], 0.25 * ra.tensors[head] + 0.75 * rb.tensors[head])
    theirs = peft.PeftModel.from_pretrained(tiny_llama(seed=0), out.path).eval()
    ours = tiny_llama(seed=0)
    lp.load_adapter(ours, out.path)
    assert_close(logits(theirs), logits(ours))
    with pytest.raises(UnsupportedFeatureError, match="sum to 1"):
        combine([ra, rb], [1.0, 1.0], "cat")
    c = saved(tmp_path, "c", tiny_llama, 3, r=2, target_modules=["q_proj"])
    with pytest.raises(UnsupportedFeatureError, match="replace different modules"):
        combine([a, c], [0.5, 0.5], "cat")


def test_saved_files_record_sources_and_base(tmp_path):
    a = saved(tmp_path, "a", tiny_llama, 1, r=2, target_modules=["q_proj"])
    b = saved(tmp_path, "b", tiny_llama, 2, r=2, target_modules=["q_proj"])
    out = save_combined(combine([a, b], [0.5, 0.5], "linear"), tmp_path / "out")
    back = lp.read_adapter(out.path)  # verifies the recorded content hash
    assert back.content_hash == out.content_hash and back.base_fingerprint == lp.read_adapter(a).base_fingerprint
    with safe_open(str(out.path / "adapter_model.safetensors"), framework="pt") as fh:
        record = json.loads(fh.metadata()["loraplex.combine"])
    assert record["method"] == "linear" and record["weights"] == [0.5, 0.5]
    assert [s["path"] for s in record["sources"]] == [str(a), str(b)]
    assert json.loads((out.path / "loraplex_combine.json").read_text())["modules"][0]["rank"] == 2


# -- refusals -----------------------------------------------------------------------------------------------------
def test_refusals(tmp_path):
    a = saved(tmp_path, "a", tiny_llama, 1, r=2, target_modules=["q_proj", "v_proj"])
    other_base = tmp_path / "other"
    m = tiny_llama(seed=5)
    lp.inject(m, lp.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), "a")
    lp.save_adapter(m, "a", other_base)
    with pytest.raises(BaseMismatchError, match="different base models"):
        combine([a, other_base], [1, 1])
    q_only = saved(tmp_path, "q", tiny_llama, 2, r=4, target_modules=["q_proj"])
    with pytest.raises(IncompatibleAdaptersError, match="v_proj.*union=True"):
        combine([a, q_only], [1, 1])
    with pytest.raises(IncompatibleAdaptersError, match="'cat'.*'svd'"):
        combine([a, q_only], [1, 1], "linear", union=True)
    g = torch.Generator().manual_seed(0)
    x = mem_adapter({"x.q": (torch.randn(2, 5, generator=g), torch.randn(4, 2, generator=g))}, "x", r=2)
    y = mem_adapter({"x.q": (torch.randn(2, 6, generator=g), torch.randn(4, 2, generator=g))}, "y", r=2)
    with pytest.raises(ShapeMismatchError, match="x.q"):
        combine([x, y], [1, 1])
    for kwargs, match in [(dict(weights=[1]), "one weight per adapter"), (dict(method="avg"), "unknown combine"),
                          (dict(method="ties"), "density in"), (dict(method="ties", density=0.0), "density in"),
                          (dict(method="dare_ties", density=1.5), "density in"), (dict(density=0.5), "applies only"),
                          (dict(rank=2), "takes its rank"), (dict(method="svd", rank=0), "positive integer"),
                          (dict(weights=[1, float("nan")]), "finite")]:
        args = dict(weights=[1, 1], method="cat") | kwargs
        with pytest.raises(ConfigError, match=match):
            combine([x, x], args.pop("weights"), args.pop("method"), **args)
    ab = (x.tensors["x.q.lora_A.weight"], x.tensors["x.q.lora_B.weight"])
    biased = mem_adapter({"x.q": ab}, "b", r=2, bias="all")
    with pytest.raises(UnsupportedFeatureError, match="bias"):
        combine([biased], [1])


def test_union_counts_a_missing_delta_as_zero(tmp_path):
    a = saved(tmp_path, "a", tiny_llama, 1, r=2, target_modules=["q_proj", "v_proj"])
    q_only = saved(tmp_path, "q", tiny_llama, 2, r=4, target_modules=["q_proj"])
    out = combine([a, q_only], [0.5, 2.0], "cat", union=True)
    da, dq, do = deltas(lp.read_adapter(a)), deltas(lp.read_adapter(q_only)), deltas(out)
    for m in da:
        assert_close(do[m], 0.5 * da[m] + (2.0 * dq[m] if m in dq else 0))


# -- extract ------------------------------------------------------------------------------------------------------
def _finetuned(rank=3, seed=9):
    """tiny_llama(0) plus a planted rank-`rank` update on every q_proj/v_proj, and a changed norm."""
    ft = tiny_llama(seed=0)
    g = torch.Generator().manual_seed(seed)
    planted = {}
    with torch.no_grad():
        for name, mod in ft.named_modules():
            if name.endswith(("q_proj", "v_proj")):
                out_f, in_f = mod.weight.shape
                planted[name] = torch.randn(out_f, rank, generator=g) @ torch.randn(rank, in_f, generator=g) * 0.1
                mod.weight += planted[name]
        ft.model.norm.weight += 0.5
    return ft, planted


def test_extract_recovers_a_planted_update_and_reports_the_error():
    ft, planted = _finetuned(rank=3)
    adapter, rep = extract_lora(tiny_llama(seed=0), ft, rank=3)
    assert adapter.config.task_type == "CAUSAL_LM"  # as save_adapter writes: PEFT's AutoPeftModel needs it
    assert sorted(r.module for r in rep.modules) == sorted(planted)  # the unchanged linears are left out
    assert rep.max_error < 1e-4 and "model.norm.weight" in rep.not_captured
    assert all(m.rank == 3 for m in rep.modules)
    for m, d in deltas(adapter).items():
        assert_close(d, planted[m].double(), scale=100)
    model = tiny_llama(seed=0)
    lp.load_adapter(model, adapter)
    with torch.no_grad():
        ft.model.norm.weight -= 0.5  # what LoRA cannot carry
    assert_close(logits(model), logits(ft), scale=100)
    low, rep1 = extract_lora(tiny_llama(seed=0), ft, rank=1, targets=["q_proj"])
    for row in rep1.modules:
        true = (deltas(low)[row.module] - planted[row.module].double()).norm() / planted[row.module].norm()
        assert row.error == pytest.approx(true.item(), rel=1e-3) and row.error > 0.1
    _, rep_e = extract_lora(tiny_llama(seed=0), ft, energy=0.999)
    assert all(m.rank <= 3 and m.energy >= 0.999 for m in rep_e.modules)


def test_extract_gpt2_conv1d_embedding_and_refusals():
    base, ft = tiny_gpt2(seed=0, tie_word_embeddings=False), tiny_gpt2(seed=0, tie_word_embeddings=False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        ft.transformer.h[0].attn.c_attn.weight += torch.randn(64, 2, generator=g) @ torch.randn(2, 192, generator=g)
        ft.transformer.wte.weight += torch.randn(128, 2, generator=g) @ torch.randn(2, 64, generator=g)
    adapter, rep = extract_lora(base, ft, rank=2, targets=["c_attn", "wte"])
    assert adapter.config.fan_in_fan_out and rep.max_error < 1e-4 and "transformer.h.1.attn.c_attn" in rep.unchanged
    model = tiny_gpt2(seed=0, tie_word_embeddings=False)
    lp.load_adapter(model, adapter)
    assert_close(logits(model), logits(ft), scale=100)
    with pytest.raises(ConfigError, match="rank .* or energy"):
        extract_lora(base, ft)
    with pytest.raises(ConfigError, match="nothing to extract"):
        extract_lora(base, tiny_gpt2(seed=0, tie_word_embeddings=False), rank=2)
    with pytest.raises(BaseMismatchError, match="architecture"):
        extract_lora(base, tiny_gpt2(seed=0, n_layer=1, tie_word_embeddings=False), rank=2)


# -- CLI ----------------------------------------------------------------------------------------------------------
def test_cli_combine_and_extract_end_to_end(tmp_path, capsys):
    a = saved(tmp_path, "a", tiny_llama, 1, r=2, target_modules=["q_proj", "v_proj"])
    b = saved(tmp_path, "b", tiny_llama, 2, r=4, target_modules=["q_proj", "v_proj"])
    assert main(["combine", str(a), str(b), "--weights", "0.6", "-0.4", "--method", "svd", "--rank", "3",
                 "--out", str(tmp_path / "c")]) == 0
    text = capsys.readouterr().out
    assert "model.layers.*.self_attn.q_proj" in text and "max error" in text and "wrote" in text
    out = lp.read_adapter(tmp_path / "c")
    assert out.config.r == 3 and json.loads((tmp_path / "c" / "loraplex_combine.json").read_text())["method"] == "svd"
    assert main(["combine", str(a), str(b), "--weights", "1", "--out", str(tmp_path / "bad")]) == 1
    assert "one weight per adapter" in capsys.readouterr().err
    tiny_llama(seed=0).save_pretrained(tmp_path / "base")
    _finetuned(rank=2)[0].save_pretrained(tmp_path / "ft")
    assert main(["extract", "--base", str(tmp_path / "base"), "--finetuned", str(tmp_path / "ft"), "--rank", "2",
                 "--out", str(tmp_path / "x")]) == 0
    text = capsys.readouterr().out
    assert "model.norm.weight" in text and "wrote" in text
    assert lp.read_adapter(tmp_path / "x").config.r == 2


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_combine_never_replaces_what_it_was_not_told_to(tmp_path, capsys):
    a = saved(tmp_path, "a", tiny_llama, 1, r=2, target_modules=["q_proj"])
    b = saved(tmp_path, "b", tiny_llama, 2, r=2, target_modules=["q_proj"])
    inputs = {a: _files(a), b: _files(b)}
    (tmp_path / "notes").write_text("mine")
    args = [str(a), str(b), "--weights", "1", "1"]
    assert main(["combine", *args, "--out", str(tmp_path / "notes")]) == 1  # a file is not turned into a folder
    assert "--overwrite" in capsys.readouterr().err and (tmp_path / "notes").read_text() == "mine"
    for out in (a, tmp_path):  # is an input; holds the inputs
        assert main(["combine", *args, "--out", str(out), "--overwrite"]) == 1
        assert "input" in capsys.readouterr().err
    assert {d: _files(d) for d in inputs} == inputs
    assert main(["combine", *args, "--out", str(tmp_path / "c")]) == 0
    first = lp.read_adapter(tmp_path / "c").content_hash
    with pytest.raises(OutputExistsError, match="overwrite=True"):
        save_combined(combine([a, b], [1.0, -1.0]), tmp_path / "c")
    assert lp.read_adapter(tmp_path / "c").content_hash == first
    assert save_combined(combine([a, b], [1.0, -1.0]), tmp_path / "c", overwrite=True).content_hash != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c", "notes"]  # no hidden leftovers


def test_combine_after_a_killed_one_and_on_a_full_disk(tmp_path, capsys, monkeypatch):
    """A killed combine's complete temporary folder is removed by the next writer of that target; a full disk
    is one clean error line that leaves nothing behind."""
    a = saved(tmp_path, "a", tiny_llama, 1, r=2, target_modules=["q_proj"])
    killed = tmp_path / ".mix.tmp-3f2a9c1d"  # what an earlier loraplex's mkdtemp named it
    killed.mkdir()
    for f in a.iterdir():
        (killed / f.name).write_bytes(f.read_bytes())

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr("loraplex.workflows.extract.save_file", full)
    assert main(["combine", str(a), "--weights", "0.5", "--out", str(tmp_path / "mix")]) == 1
    assert "cannot write" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # the stale folder went, no new one stayed
    monkeypatch.undo()
    assert main(["combine", str(a), "--weights", "0.5", "--out", str(tmp_path / "mix")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "mix"]
