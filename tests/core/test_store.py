"""Adapter files: save -> load bit-exact, PEFT interop both ways (PEFT is the oracle), every refusal,
atomic writes."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import loraplex as lp
from loraplex.layers import ModulesToSave
from loraplex.models import SMOLLM2_HUB_ID, load_base, tiny_conv, tiny_gpt2, tiny_llama, tiny_mlp
from loraplex.outputs import atomic_directory
from loraplex.store import CONFIG_NAME, LEGACY_WEIGHTS_NAME, WEIGHTS_NAME

ATOL, RTOL = lp.tolerance(torch.float32)

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
    "llama-layers-pattern-str": (tiny_llama, dict(r=2, target_modules=["q_proj", "up_proj"], layers_to_transform=[1],
                                                  layers_pattern="layers")),
    "llama-layers-pattern-list": (tiny_llama, dict(r=2, target_modules=["k_proj"], layers_to_transform=0,
                                                   layers_pattern=["h", "layers"])),
    "llama-all-layers": (tiny_llama, dict(r=2, target_modules=["q_proj"], layers_to_transform=[])),
    "llama-mts-suffix": (tiny_llama, dict(r=2, target_modules=["q_proj"], modules_to_save=["norm"])),
    "llama-orthogonal-init": (tiny_llama, dict(r=2, target_modules=["v_proj"], init_lora_weights="orthogonal")),
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
def test_same_modules_as_peft(case):
    """target_modules (with layers_to_transform/layers_pattern) and modules_to_save select what PEFT selects."""
    build, kw = INTEROP[case]
    pm = peft.get_peft_model(build(seed=1), peft.LoraConfig(**kw))
    wrapped = {kind: {n.removeprefix("base_model.model.") for n, m in pm.named_modules() if isinstance(m, cls)}
               for kind, cls in (("lora", peft.tuners.lora.LoraLayer), ("copies", peft.utils.ModulesToSaveWrapper))}
    model = build(seed=1)
    kw = kw | {"init_lora_weights": False}  # loraplex starts new adapters with True/False/gaussian only
    assert set(lp.inject(model, lp.LoraConfig(**kw), "a")) == wrapped["lora"]
    assert {n for n, m in model.named_modules() if isinstance(m, ModulesToSave)} == wrapped["copies"]


@pytest.mark.parametrize("case", sorted(INTEROP))
def test_loraplex_writes_peft_reads(case, tmp_path):
    build, kw = INTEROP[case]
    model = build(seed=1)
    lp.inject(model, lp.LoraConfig(**kw | {"init_lora_weights": False}), "a")
    _randomize(model, "a")
    want = _out(model)
    lp.save_adapter(model, "a", tmp_path / "a")
    pm = peft.PeftModel.from_pretrained(build(seed=1), tmp_path / "a").eval()
    torch.testing.assert_close(_out(pm), want, atol=ATOL, rtol=RTOL)


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
    torch.testing.assert_close(_out(model), want, atol=ATOL, rtol=RTOL)


def test_legacy_bin_is_read_with_weights_only(tmp_path):
    pm = peft.get_peft_model(tiny_llama(seed=1), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    _randomize(pm, "default")
    want = _out(pm.eval())
    pm.save_pretrained(tmp_path / "p", safe_serialization=False)
    assert (tmp_path / "p" / LEGACY_WEIGHTS_NAME).exists()
    model = tiny_llama(seed=1)
    lp.load_adapter(model, tmp_path / "p")
    torch.testing.assert_close(_out(model), want, atol=ATOL, rtol=RTOL)


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
    ("use_qalora", True, "use_qalora=True"),
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


def test_a_target_no_wrapper_supports_is_refused_before_anything_changes(tmp_path):
    """validate_adapter checks targets by wrapper class and shapes, without building wrappers: a base whose
    targeted conv became grouped (or padding_mode "circular") is refused as at injection, nothing changed."""
    model = tiny_conv(seed=0)
    lp.inject(model, lp.LoraConfig(r=2, target_modules=["conv1d", "head"]), "a")
    lp.save_adapter(model, "a", tmp_path / "a")
    named = r"^adapter '.*': "  # validate_adapter names the file (inject would not)
    for change, match in (({"groups": 2}, named + "LoRA on grouped"),
                          ({"padding_mode": "circular"}, named + "LoRA needs")):
        other = tiny_conv(seed=0)
        other.conv1d = torch.nn.Conv1d(8, 8, kernel_size=3, padding=1, **change)
        _refused(tmp_path / "a", lp.UnsupportedModuleError, match, model=other, check_base_model=False)
    fine = tiny_conv(seed=0)
    lp.load_adapter(fine, tmp_path / "a")
    assert torch.equal(fine(IDS), model(IDS))


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
        with atomic_directory(target, overwrite=True) as tmp:
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
        lp.save_adapter(model, "a", d, overwrite=True)
    assert lp.read_adapter(d).content_hash == good


# -- adapter-file rules (docs/concepts.md "Adapter files") ------------------------------------------------------
def _edit_config(d, **changes):
    """Change adapter_config.json; the safetensors header loses loraplex's facts (content hash, fingerprint), as
    in a PEFT-written file, so the checks behind the content hash are what is tested."""
    cfg = json.loads((d / CONFIG_NAME).read_text())
    (d / CONFIG_NAME).write_text(json.dumps(cfg | changes))
    save_file(load_file(str(d / WEIGHTS_NAME)), str(d / WEIGHTS_NAME))


def test_peft_adapter_with_dropout_loads_in_eval_mode(tmp_path):
    """Wrappers join the model in its mode: an eval model stays deterministic (PEFT's eval output), a train
    model gets live dropout."""
    pm = peft.get_peft_model(tiny_llama(seed=1), peft.LoraConfig(r=4, lora_dropout=0.5, target_modules=["q_proj", "v_proj"],
                                                                 modules_to_save=["lm_head"]))
    _randomize(pm, "default")
    want = _out(pm.eval())
    pm.save_pretrained(tmp_path / "p")
    model = tiny_llama(seed=1)
    lp.load_adapter(model, tmp_path / "p")
    assert not any(m.training for m in model.modules())
    for _ in range(2):
        torch.testing.assert_close(_out(model), want, atol=ATOL, rtol=RTOL)
    model.train()
    assert not torch.equal(_out(model), _out(model))


@pytest.mark.parametrize("init", [True, False, "gaussian", "orthogonal", "eva"])
def test_inits_that_leave_a_plain_lora_on_disk_are_read(tmp_path, init):
    d = _saved(tmp_path)
    model = tiny_llama(seed=1)
    want = _out(lp.load_adapter(model, d) and model)
    _edit_config(d, init_lora_weights=init)
    model = tiny_llama(seed=1)
    lp.load_adapter(model, d)
    torch.testing.assert_close(_out(model), want, atol=0, rtol=0)  # bit for bit: a load never runs the init


@pytest.mark.parametrize("init, match", [
    ("pissa", "residual"), ("pissa_niter_4", "residual"), ("olora", "residual"), ("corda", "residual"),
    ("lora_ga", "residual"), ("loftq", "quantized"), ("mica", "lora_B frozen"),
])
def test_inits_that_rewrite_the_base_are_refused(tmp_path, init, match):
    d = _saved(tmp_path)
    _edit_config(d, init_lora_weights=init)
    _refused(d, lp.UnsupportedFeatureError, f"{CONFIG_NAME}.*init_lora_weights='{init}': .*{match}")
    with pytest.raises(lp.UnsupportedFeatureError, match="cannot initialize a new adapter"):
        lp.inject(tiny_llama(), lp.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="eva"))


def test_written_config_loads_with_auto_peft_model(tmp_path):
    """task_type and a resolvable base_model_name_or_path: PEFT's AutoPeftModel rebuilds base + adapter alone."""
    tiny_llama(seed=1).save_pretrained(tmp_path / "base")
    model, _ = load_base(tmp_path / "base")
    lp.inject(model, lp.LoraConfig(r=2, target_modules=["q_proj", "o_proj"], init_lora_weights=False), "a")
    lp.save_adapter(model, "a", tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    assert (cfg["task_type"], cfg["base_model_name_or_path"]) == ("CAUSAL_LM", str((tmp_path / "base").resolve()))
    pm = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "a").eval()
    torch.testing.assert_close(_out(pm), _out(model), atol=ATOL, rtol=RTOL)


def test_written_base_id_is_resolvable_and_old_files_still_read(tmp_path):
    model = tiny_llama(seed=1)
    lp.inject(model, lp.LoraConfig(r=2, target_modules=["q_proj"]), "a")
    lp.save_adapter(model, "a", tmp_path / "a", base_name="smollm2")
    assert json.loads((tmp_path / "a" / CONFIG_NAME).read_text())["base_model_name_or_path"] == SMOLLM2_HUB_ID
    _edit_config(tmp_path / "a", base_model_name_or_path="smollm2")  # as loraplex wrote it before
    assert lp.read_adapter(tmp_path / "a").config.base_model_name_or_path == SMOLLM2_HUB_ID
    mlp = tiny_mlp()
    lp.inject(mlp, lp.LoraConfig(r=2, target_modules=["head"]), "a")
    assert json.loads((lp.save_adapter(mlp, "a", tmp_path / "m").path / CONFIG_NAME).read_text())["task_type"] is None


@pytest.mark.parametrize("r", [3, 20000, 1_000_000_000_000])
def test_config_rank_is_checked_against_the_tensors_before_allocating(tmp_path, r):
    """A config r that the file's tensors contradict is refused by read_adapter (the file alone: nothing is
    sized by r), and so by every reader; a rank_pattern exception too."""
    d = _saved(tmp_path)
    _edit_config(d, r=r)
    with pytest.raises(lp.ShapeMismatchError, match=rf"{d}.*declares r={r}"):
        lp.read_adapter(d)
    _edit_config(d, r=2, rank_pattern={"v_proj": r})
    with pytest.raises(lp.ShapeMismatchError, match=rf"v_proj.*declares r={r}"):
        lp.read_adapter(d)


def test_untouched_target_is_refused_before_anything_is_allocated(tmp_path):
    """A target the file has no weights for (here with an absurd r) is refused by validate_adapter, before inject."""
    d = _saved(tmp_path)
    _edit_config(d, r=2, target_modules=["q_proj", "v_proj", "k_proj"], rank_pattern={"k_proj": 1_000_000_000_000})
    af = lp.read_adapter(d)
    model = tiny_llama(seed=1)
    with pytest.raises(lp.AdapterFileError, match=r"lacks tensors .*k_proj"):
        lp.validate_adapter(af, model)
    _refused(d, lp.AdapterFileError, "lacks tensors", model=model)


@pytest.mark.parametrize("changes", [
    dict(target_modules=["q_proj"]),
    dict(target_modules=r".*\.q_proj"),
    dict(exclude_modules=["v_proj"]),
    dict(layers_to_transform=[0], target_modules=["q_proj", "v_proj"]),
    dict(modules_to_save=["v_proj"]),
])
def test_tensors_contradicting_target_modules_are_refused_by_every_reader(tmp_path, changes):
    d = _saved(tmp_path)  # q_proj and v_proj of both layers
    _edit_config(d, **changes)
    with pytest.raises(lp.AdapterFileError, match=r"holds LoRA weights for .*which its config does not target"):
        lp.read_adapter(d)


@pytest.mark.parametrize("dtype, error, match", [
    (torch.int64, lp.AdapterFileError, "must be floating point"),
    (torch.bool, lp.AdapterFileError, "must be floating point"),
    (torch.bfloat16, lp.NonFiniteError, "NaN/Inf"),
])
def test_non_floating_or_non_finite_factors_are_refused(tmp_path, dtype, error, match):
    d = _saved(tmp_path)
    tensors = load_file(str(d / WEIGHTS_NAME))
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = tensors[key].to(dtype) if dtype != torch.bfloat16 else tensors[key].to(dtype).fill_(float("inf"))
    save_file(tensors, str(d / WEIGHTS_NAME))
    with pytest.raises(error, match=match):
        lp.read_adapter(d)


def test_non_floating_copy_of_a_float_module_is_refused(tmp_path):
    d = _saved(tmp_path, modules_to_save=["lm_head"])
    tensors = load_file(str(d / WEIGHTS_NAME))
    tensors["base_model.model.lm_head.weight"] = tensors["base_model.model.lm_head.weight"].to(torch.int64)
    save_file(tensors, str(d / WEIGHTS_NAME))
    _refused(d, lp.AdapterFileError, "'lm_head.weight' holds torch.int64 values where the base has torch.float32")


def test_bad_config_value_names_the_file(tmp_path):
    d = _saved(tmp_path)
    _edit_config(d, r="x")
    _refused(d, lp.ConfigError, rf"{d / CONFIG_NAME}: r must be a positive integer, got 'x'")


_BAD = {
    "r": [0, -1, 2.5, 3, 20000, 10**12, "x", True, None, []],
    "lora_alpha": [float("nan"), float("inf"), float("-inf"), 0, -3, "8", True, None],
    "lora_dropout": [float("nan"), 1.0, -0.1, "0.1", True],
    "target_modules": [5, [], [""], [1], {}, "(", "all-linear", "lm_head", ".*"],
    "exclude_modules": [5, [2], "(", ["q_proj"]],
    "layers_to_transform": [-1, "0", [0.5], True, [True], [], 7],
    "layers_pattern": [5, [1], "layers", ["nothing"]],
    "rank_pattern": ["abc", [1], {"q_proj": 0}, {"q_proj": 10**12}, {"(": 2}, {"q_proj": "2"}],
    "alpha_pattern": ["abc", {"q_proj": float("nan")}, {"q_proj": -1}],
    "bias": ["some", 1, None, "all"],
    "use_rslora": ["yes", 1, None],
    "fan_in_fan_out": ["x", True],
    "modules_to_save": [5, [1], "nothing_matches", ["j"], ["lm_head"]],
    "init_lora_weights": ["pissa", 3, None, "bogus"],
    "task_type": ["X", 5],
    "base_model_name_or_path": [5, []],
    "inference_mode": ["x"],
    "peft_type": ["IA3", 5],
    "use_dora": ["x", True],
}


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(sorted(_BAD)), data=st.data())
def test_any_bad_config_value_gives_a_typed_error_naming_the_file(tmp_path_factory, field, data):
    """One mechanism for the whole class: whatever a config field holds, reading and loading either work or
    raise a LoraplexError that names the adapter, with the model left as it was (never an allocation error or a
    stray TypeError/AttributeError)."""
    value = data.draw(st.one_of(st.sampled_from(_BAD[field]), st.integers(), st.floats(), st.text(max_size=4),
                                st.none(), st.lists(st.integers(0, 3), max_size=2)))
    d = _saved(tmp_path_factory.mktemp("bad"))
    _edit_config(d, **{field: value})
    model = tiny_llama(seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        lp.load_adapter(model, d)
    except lp.LoraplexError as exc:
        assert str(d) in str(exc), exc
        _assert_untouched(model, before)


@pytest.mark.parametrize("text", ['{"r": ' + "9" * 5000 + "}", "[" * 100000 + "]" * 100000, '{"r": 8',
                                  b"\xff\xfe".decode("latin-1")])
def test_unparseable_config_is_a_typed_error(tmp_path, text):
    """Any config text json cannot turn into an object (an int past Python's digit limit, nesting past the
    recursion limit, truncated, not UTF-8) is an AdapterFileError naming the file, never a bare ValueError."""
    from loraplex.errors import AdapterFileError

    (tmp_path / "adapter_config.json").write_text(text, encoding="latin-1")
    with pytest.raises(AdapterFileError, match="adapter_config.json"):
        lp.read_adapter(tmp_path)


def test_peft_trainable_token_indices_file_is_read_and_load_adapter_refuses_it(tmp_path):
    """PEFT's trainable_token_indices (new rows of the input embedding for chosen ids): read_adapter reads the file
    (loraplex.tokens.token_rows gives PEFT's ids and rows, served per row by the runtime and the server:
    tests/runtime/test_embedding_rows.py); load_adapter does not put them on a model of its own: refused by name
    (UnsupportedFeatureError) before anything changes."""
    from loraplex import models
    from loraplex.errors import UnsupportedFeatureError
    from loraplex.tokens import token_rows

    base = models.tiny_llama(seed=0)
    cfg = peft.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[1, 2])
    pm = peft.get_peft_model(base, cfg)
    pm.save_pretrained(tmp_path / "tt")
    rows = token_rows(lp.read_adapter(tmp_path / "tt"))
    assert rows.module == "model.embed_tokens" and rows.indices.tolist() == [1, 2]
    peft_rows = pm.base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta["default"]
    assert torch.equal(rows.values, peft_rows)
    fresh = models.tiny_llama(seed=0)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(UnsupportedFeatureError, match="trainable_token_indices"):
        lp.load_adapter(fresh, tmp_path / "tt", "tt")
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    assert not list(lp.lora_layers(fresh))
