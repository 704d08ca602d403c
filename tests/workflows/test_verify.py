"""verify: every way of running an adapter matches the fp32 on-the-fly reference, and the check can fail;
golden logits round-trip through an adapter directory without changing the adapter."""

from __future__ import annotations

import copy
import json
import time

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import loraplex as lp
import loraplex.workflows.probes as probes_mod
import loraplex.workflows.verify as V
from loraplex.cli import main
from loraplex.errors import AdapterFileError, ConfigError, UnsupportedModuleError
from loraplex.workflows.export import export_merged
from loraplex.models import load_base, tiny_llama
from loraplex.workflows.probes import Reference, compare, make_probes, read_golden

EXACT = ("merged", "on_the_fly", "mixed_batch", "exported")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def _adapter(directory, seed=3, **kw):
    """A non-trivial adapter for load_base("tiny-llama") (= tiny_llama(seed=0)): A and B both random."""
    model = tiny_llama(seed=0)
    cfg = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    lp.inject(model, lp.LoraConfig(**{**cfg, **kw}), "a", seed=seed)
    lp.save_adapter(model, "a", directory)
    return directory


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    return _adapter(tmp_path_factory.mktemp("verify") / "adapter")


@pytest.fixture
def fresh_adapter(tmp_path):
    return _adapter(tmp_path / "adapter")


def _files(directory):
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


# -- verify ---------------------------------------------------------------------------------------------------
def test_exact_variants_pass_in_fp32_and_bf16(adapter_dir):
    report = V.verify("tiny-llama", adapter_dir)
    rows = {(r.variant, r.dtype): r for r in report.rows}
    assert set(rows) == {(v, d) for v in V.ALL_VARIANTS for d in ("fp32", "bf16")}
    for v in EXACT:
        for d in ("fp32", "bf16"):
            assert rows[v, d].status == "PASS", report.table()
    assert rows["merged", "fp32"].worst_ratio < 0.1 and rows["on_the_fly", "fp32"].max_abs == 0
    assert rows["merged", "fp32"].agree == 1.0
    for v in ("quantized_int8", "quantized_nf4"):  # informational, never silently skipped
        for d in ("fp32", "bf16"):
            assert rows[v, d].status in ("INFO", "UNAVAILABLE") and not rows[v, d].required
            assert rows[v, d].status != "INFO" or "bare quantized base" in rows[v, d].note
    assert report.passed and report.summary() == "all required checks passed"
    table = report.table()
    assert "max|dlogit|" in table and "KL(ref||v)" in table and "greedy agree" in table and "PASS" in table


def test_the_adapter_matters(adapter_dir):
    """The probe set sees the adapter: the bare base is far outside the tolerance (so a dropped adapter fails)."""
    report = V.verify("tiny-llama", adapter_dir, variants=["on_the_fly"], dtypes=["fp32"])
    ctx = report.context
    base = V.run_logits(ctx.base, ctx.probes).float()
    ref = Reference.from_logits(report.reference[ctx.probes.attention_mask.bool()])
    tol = V.tolerance_for(torch.float32)
    m = compare(ref, base[ctx.probes.attention_mask.bool()], tol.atol, tol.rtol)
    assert m.worst_ratio > 100 and m.kl > 1e3 * tol.kl


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_broken_variant_fails(adapter_dir, monkeypatch, dtype):
    """A variant added as one more VARIANTS entry: merging with weight 0.5 instead of 1 must FAIL."""

    def half_merged(ctx, torch_dtype):
        return V.run_logits(lp.merge_and_unload(ctx.with_adapter(torch_dtype), {"verify": 0.5}), ctx.probes)

    monkeypatch.setitem(V.VARIANTS, "half_merged", V.Variant(half_merged, True, "deliberately wrong"))
    report = V.verify("tiny-llama", adapter_dir, variants=["merged", "half_merged"], dtypes=[dtype])
    status = {r.variant: r.status for r in report.rows}
    assert status == {"merged": "PASS", "half_merged": "FAIL"}, report.table()
    assert not report.passed and "half_merged/" + dtype in report.summary()


def test_a_corrupted_export_fails(adapter_dir, monkeypatch):
    """The exported variant reads the real directory: a weight damaged on disk is caught."""
    real = V.export_merged

    def corrupt_export(model, tokenizer, adapters, out, **kw):
        rep = real(model, tokenizer, adapters, out, **kw)
        path = out / "model.safetensors"
        tensors = load_file(path)
        key = next(k for k in tensors if k.endswith("layers.1.mlp.down_proj.weight"))
        tensors[key] = tensors[key] * 1.05
        save_file(tensors, path, metadata={"format": "pt"})
        return rep

    monkeypatch.setattr(V, "export_merged", corrupt_export)
    report = V.verify("tiny-llama", adapter_dir, variants=["exported"], dtypes=["fp32"])
    assert [r.status for r in report.rows] == ["FAIL"], report.table()


def test_quantized_variant_unavailable_is_reported(adapter_dir, monkeypatch):
    import loraplex.quant

    def refuse(model, scheme, **kw):
        raise UnsupportedModuleError("LoRA over quantized layers is not built yet")

    monkeypatch.setattr(loraplex.quant, "quantize_model", refuse)
    report = V.verify("tiny-llama", adapter_dir, variants=["quantized_nf4"], dtypes=["fp32"])
    (row,) = report.rows
    assert row.status == "UNAVAILABLE" and "not built yet" in row.note and "nf4" in row.note
    assert report.passed and "UNAVAILABLE: LoRA over a nf4 base" in report.table()


def test_mixed_batch_unavailable_for_modules_to_save(tmp_path):
    d = _adapter(tmp_path / "mts", target_modules=["q_proj"], modules_to_save=["lm_head"])
    report = V.verify("tiny-llama", d, variants=["merged", "mixed_batch"], dtypes=["fp32"])
    status = {r.variant: (r.status, r.note) for r in report.rows}
    assert status["merged"][0] == "PASS"
    assert status["mixed_batch"][0] == "UNAVAILABLE" and "modules_to_save" in status["mixed_batch"][1]


def test_verify_takes_a_model_and_leaves_it_alone(adapter_dir):
    base = tiny_llama(seed=0)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    report = V.verify(base, adapter_dir, variants=["merged"], dtypes=["fp32"])
    assert report.passed and not list(lp.lora_layers(base))
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    lp.load_adapter(base, adapter_dir, "a")
    with pytest.raises(ConfigError, match="bare base"):
        V.verify(base, adapter_dir)


def test_bad_arguments_are_refused(adapter_dir):
    with pytest.raises(ConfigError, match="unknown variant"):
        V.verify("tiny-llama", adapter_dir, variants=["runtime_typo"])
    with pytest.raises(ConfigError, match="dtype"):
        V.verify("tiny-llama", adapter_dir, dtypes=["fp8"])
    with pytest.raises(ConfigError, match="tokenizer"):
        V.verify("tiny-llama", adapter_dir, prompts=["hello"])


# -- probes and metrics ---------------------------------------------------------------------------------------
def test_random_probes_are_deterministic_and_padded():
    a = make_probes(None, None, vocab_size=128, max_length=20)
    b = make_probes(None, None, vocab_size=128, max_length=20)
    assert torch.equal(a.input_ids, b.input_ids) and a.input_ids.shape == (8, 20)
    lengths = a.attention_mask.sum(1)
    assert lengths[0] == 20 and lengths[-1] < 20 and a.positions == int(lengths.sum())


def test_topk_reference_kl_is_a_lower_bound_and_exact_at_full_k():
    gen = torch.Generator().manual_seed(0)
    r = torch.randn(50, 300, generator=gen) * 3
    v = r + 0.3 * torch.randn(50, 300, generator=gen)
    full = compare(Reference.from_logits(r), v, 1e-4, 1e-3)
    top = compare(Reference.from_logits(r, top_k=16), v, 1e-4, 1e-3)
    same = compare(Reference.from_logits(r, top_k=300), v, 1e-4, 1e-3)
    assert 0 < top.kl <= full.kl and same == full
    assert top.agree == full.agree and top.max_abs <= full.max_abs
    exact = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=r.double()), torch.distributions.Categorical(logits=v.double()))
    assert full.kl == pytest.approx(float(exact.mean()), rel=1e-9)


# -- golden logits ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("topk", [False, True], ids=["full", "top-k"])
def test_golden_round_trip(fresh_adapter, tmp_path, monkeypatch, topk):
    if topk:  # force the top-k format that large vocabularies use
        monkeypatch.setattr(probes_mod, "FULL_LOGITS_MAX_BYTES", 0)
        monkeypatch.setattr(probes_mod, "TOP_K", 16)
    facts = V.record_golden(fresh_adapter, "tiny-llama")
    assert facts["logits"] == ("top16" if topk else "full") and facts["positions"] > 0
    assert json.loads((fresh_adapter / "golden.json").read_text())["sha256"] == facts["sha256"]
    for dtype in ("fp32", "bf16"):  # the right deployment passes in its own dtype
        base, _ = load_base("tiny-llama")
        export_merged(base, None, [fresh_adapter], tmp_path / f"merged-{dtype}", dtype=dtype)
        (row,) = V.check_golden(tmp_path / f"merged-{dtype}", fresh_adapter).rows
        assert (row.status, row.dtype) == ("PASS", dtype), row
    on_the_fly, _ = load_base("tiny-llama")
    lp.load_adapter(on_the_fly, fresh_adapter, "a")
    assert V.check_golden(on_the_fly, fresh_adapter).passed
    # wrong deployments fail: another adapter merged, the bare base, half the adapter
    other = _adapter(tmp_path / "other", seed=11)
    base, _ = load_base("tiny-llama")
    export_merged(base, None, [other], tmp_path / "wrong", dtype="fp32")
    assert [r.status for r in V.check_golden(tmp_path / "wrong", fresh_adapter).rows] == ["FAIL"]
    bare, _ = load_base("tiny-llama")
    assert not V.check_golden(bare, fresh_adapter).passed
    half, _ = load_base("tiny-llama")
    lp.load_adapter(half, fresh_adapter, "a")
    lp.merge(half, "a", 0.5)
    assert not V.check_golden(half, fresh_adapter).passed


def test_golden_files_leave_the_adapter_untouched(fresh_adapter):
    before = _files(fresh_adapter)
    digest = lp.read_adapter(fresh_adapter).content_hash
    V.record_golden(fresh_adapter, "tiny-llama")
    V.record_golden(fresh_adapter, "tiny-llama")  # recording again replaces the golden files
    after = _files(fresh_adapter)
    assert set(after) == set(before) | {"golden.safetensors", "golden.json"}  # no temporary files left
    assert all(after[k] == v for k, v in before.items())
    assert lp.read_adapter(fresh_adapter).content_hash == digest
    pm = peft.PeftModel.from_pretrained(tiny_llama(seed=0), fresh_adapter).eval()
    ours = tiny_llama(seed=0)
    lp.load_adapter(ours, fresh_adapter, "a")
    ids = read_golden(fresh_adapter).probes.input_ids
    with torch.no_grad():
        atol, rtol = lp.tolerance(torch.float32)
        torch.testing.assert_close(pm(ids).logits, ours(ids).logits, atol=atol, rtol=rtol)


def test_stale_or_damaged_golden_is_refused(fresh_adapter, tmp_path):
    V.record_golden(fresh_adapter, "tiny-llama")
    on_the_fly, _ = load_base("tiny-llama")
    lp.load_adapter(on_the_fly, fresh_adapter, "a")
    golden = _files(fresh_adapter)
    (fresh_adapter / "golden.safetensors").write_bytes(golden["golden.safetensors"][:-8] + b"\0" * 8)
    with pytest.raises(AdapterFileError, match="sha256"):
        V.check_golden(on_the_fly, fresh_adapter)
    (fresh_adapter / "golden.safetensors").write_bytes(golden["golden.safetensors"])
    other = _adapter(tmp_path / "other", seed=11)  # the adapter files change under the golden ones
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (fresh_adapter / name).write_bytes((other / name).read_bytes())
    with pytest.raises(AdapterFileError, match="record them again"):
        V.check_golden(on_the_fly, fresh_adapter)
    with pytest.raises(AdapterFileError, match="no golden logits"):
        V.check_golden(on_the_fly, other)


# -- CLI ------------------------------------------------------------------------------------------------------------
def test_cli_verify_record_and_check(fresh_adapter, tmp_path, capsys):
    argv = ["verify", "--base", "tiny-llama", "--adapter", str(fresh_adapter)]
    assert main(argv + ["--dtypes", "fp32", "--variants", "merged", "exported", "--record-golden"]) == 0
    out = capsys.readouterr().out
    assert "merged" in out and "exported" in out and "PASS" in out and "recorded golden logits" in out
    assert (fresh_adapter / "golden.safetensors").is_file()
    base, _ = load_base("tiny-llama")
    export_merged(copy.deepcopy(base), None, [fresh_adapter], tmp_path / "good", dtype="bf16")
    assert main(["verify", "--adapter", str(fresh_adapter), "--against", str(tmp_path / "good")]) == 0
    assert "golden vs good  bf16" in capsys.readouterr().out
    export_merged(base, None, [fresh_adapter], tmp_path / "bad", weights=[0.5])
    assert main(["verify", "--adapter", str(fresh_adapter), "--against", str(tmp_path / "bad")]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "1 required check(s) FAILED: golden vs bad/fp32" in out
    # both at once: the variants and the deployment in one table, failing because of the deployment
    assert main(argv + ["--dtypes", "fp32", "--variants", "merged", "--against", str(tmp_path / "bad")]) == 1



@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_verify_runs_on_the_chosen_device(fresh_adapter, tmp_path, device, capsys):
    """--device / device=: the reference, every variant (the exported directory too) and --against run there."""
    report = V.verify("tiny-llama", fresh_adapter, dtypes=["fp32"], variants=["merged", "exported"], device=device)
    assert report.passed and report.context.base.lm_head.weight.device.type == device
    argv = ["verify", "--base", "tiny-llama", "--adapter", str(fresh_adapter), "--dtypes", "fp32"]
    assert main(argv + ["--variants", "merged", "exported", "--record-golden", "--device", device]) == 0
    export_merged(load_base("tiny-llama")[0], None, [fresh_adapter], tmp_path / "deployed")
    assert main(["verify", "--adapter", str(fresh_adapter), "--against", str(tmp_path / "deployed"),
                 "--device", device]) == 0
    assert "golden vs deployed  fp32" in capsys.readouterr().out
    assert main(argv + ["--device", "cuda:97"]) == 1
    assert "no such device" in capsys.readouterr().err

def test_cli_errors_exit_1(fresh_adapter, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\n\nworld\n")
    assert main(["verify", "--base", "tiny-llama", "--adapter", str(fresh_adapter), "--prompts", str(prompts)]) == 1
    assert "need a tokenizer" in capsys.readouterr().err
    assert main(["verify", "--adapter", str(fresh_adapter)]) == 1
    assert "--base is required" in capsys.readouterr().err
    assert main(["verify", "--adapter", str(fresh_adapter), "--against", str(tmp_path)]) == 1
    assert "no golden logits" in capsys.readouterr().err


# -- the embedded default -----------------------------------------------------------------------------------------
@pytest.mark.smollm2
def test_smollm2_verify_passes_fp32(tmp_path, capsys):
    base, tok = load_base("smollm2", num_layers=2)
    model = copy.deepcopy(base)
    lp.inject(model, lp.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                   init_lora_weights=False), "a", seed=0)
    with torch.no_grad():  # keep the random adapter's effect realistic (B small, not kaiming-sized)
        for _, layer in lp.lora_layers(model):
            layer.lora_B["a"].weight.mul_(0.02)
    lp.save_adapter(model, "a", tmp_path / "adapter")
    start = time.perf_counter()
    report = V.verify(base, tmp_path / "adapter", tokenizer=tok, dtypes=["fp32"])
    seconds = time.perf_counter() - start
    assert report.passed, report.table()
    assert {r.variant for r in report.rows if r.status == "PASS"} == set(EXACT)
    assert "built-in prompts" in report.probes.source
    with capsys.disabled():
        print(f"\nsmollm2 (2 layers) verify, 6 variants x fp32: {seconds:.1f} s")
