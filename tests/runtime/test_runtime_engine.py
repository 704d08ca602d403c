"""loraplex.runtime.MultiLoraModel: the engine over one base, against the slow reference paths.

The oracle is the ordinary LoRA core on a separate copy of the same base with the same adapter files
(`load_adapter`): per request alone (`set_active` + a one-row forward) and per row (`route_rows`).
Tolerances come from functional.tolerance.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import loraplex as lp
from loraplex import models
from loraplex.errors import (AdapterExistsError, AdapterFileError, AdapterNotFoundError, ConfigError, MergeStateError,
                             ShapeMismatchError, TargetNotFoundError, UnsupportedFeatureError)
from loraplex.functional import tolerance
from loraplex.runtime import AdapterStore, MultiLoraModel, RuntimeLinear

PROPS = settings(max_examples=25, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
# the per-request oracle runs one HF forward per row: fewer examples here (ops-level properties run 40)
FEW = settings(PROPS, max_examples=12)
VOCAB = 128

# name -> LoraConfig fields: mixed ranks, rank/alpha patterns, rsLoRA, different target sets
SPECS = {
    "a": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "b": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}),
    "c": dict(r=2, lora_alpha=4, target_modules="all-linear", use_rslora=True, alpha_pattern={"down_proj": 7}),
    "d": dict(r=16, lora_alpha=8, target_modules=["o_proj", "gate_proj", "up_proj", "down_proj"],
              layers_to_transform=[1]),
}


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    atol, rtol = tolerance(got.dtype)
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


def write_adapter(base_factory, directory: Path, seed: int, **fields) -> Path:
    """A random (non-zero B) adapter for the base `base_factory()` builds, saved in PEFT's layout."""
    model = base_factory()
    lp.inject(model, lp.LoraConfig(init_lora_weights=False, **fields), "x", seed=seed)
    with torch.no_grad():
        for _, layer in lp.lora_layers(model):
            layer.lora_B["x"].weight.mul_(0.3)
    lp.save_adapter(model, "x", directory)
    return directory


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    dirs = {n: write_adapter(models.tiny_llama, root / n, seed=i, **f) for i, (n, f) in enumerate(SPECS.items())}
    dirs["a2"] = write_adapter(models.tiny_llama, root / "a2", seed=99, **SPECS["a"])  # another version of "a"
    return dirs


@pytest.fixture(scope="module")
def reference(adapter_dirs) -> torch.nn.Module:
    """The slow path: the LoRA core with every adapter loaded into its own copy of the base."""
    model = models.tiny_llama()
    for n, d in adapter_dirs.items():
        lp.load_adapter(model, d, n, activate=False)
    return model


@pytest.fixture(scope="module")
def engine(adapter_dirs) -> MultiLoraModel:
    eng = MultiLoraModel(models.tiny_llama())
    for n in SPECS:
        eng.load(n, adapter_dirs[n])
    return eng


def ref_rows(reference, ids, mask, rows) -> torch.Tensor:
    """Each request alone: activate its adapter(s) on the reference model and run its row by itself."""
    out = []
    with torch.no_grad():
        for b, spec in enumerate(rows):
            lp.set_active(reference, [] if spec is None else spec)
            out.append(reference(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1]).logits)
    lp.set_active(reference, [])
    return torch.cat(out)


def batch_inputs(B: int, T: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, T), generator=gen)
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    mask = (torch.arange(T)[None, :] >= (T - lengths)[:, None]).long()  # left padding
    return ids, mask


row_spec = st.one_of(
    st.none(),
    st.sampled_from(list(SPECS)),
    st.dictionaries(st.sampled_from(list(SPECS)), st.sampled_from([1.0, 0.7, 0.3, -0.5, 0.0]), min_size=1,
                    max_size=3),
)


# ---- fast batched forward == slow reference ---------------------------------------------------------------

@FEW
@given(rows=st.lists(row_spec, min_size=1, max_size=9), T=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_forward_matches_each_request_alone(engine, reference, rows, T, seed):
    ids, mask = batch_inputs(len(rows), T, seed)
    got = engine.forward(ids, mask, adapters=rows)
    close(got, ref_rows(reference, ids, mask, rows))


@PROPS
@given(rows=st.lists(st.one_of(st.none(), st.sampled_from(list(SPECS))), min_size=1, max_size=17),
       seed=st.integers(0, 2**16))
def test_forward_matches_route_rows(engine, reference, rows, seed):
    ids, mask = batch_inputs(len(rows), 5, seed)
    with torch.no_grad(), lp.route_rows(reference, rows):
        want = reference(input_ids=ids, attention_mask=mask).logits
    close(engine.forward(ids, mask, adapters=rows), want)


def test_base_rows_are_the_bare_base_bit_for_bit(engine):
    ids, mask = batch_inputs(3, 4, 0)
    bare = models.tiny_llama()
    with torch.no_grad():
        want = bare(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(engine.forward(ids, mask, adapters=[None] * 3), want)
    assert torch.equal(engine.forward(ids, mask), want)
    assert engine.batch([None, None]).plan is None  # no plan at all: the wrappers only test one attribute


def test_gpt2_conv1d(tmp_path):
    dirs = {n: write_adapter(models.tiny_gpt2, tmp_path / n, seed=i, r=r, lora_alpha=2 * r,
                             target_modules=["c_attn", "c_proj", "c_fc"])
            for i, (n, r) in enumerate([("g1", 4), ("g2", 8)])}
    eng = MultiLoraModel(models.tiny_gpt2(), target_modules=["c_attn", "c_proj", "c_fc"])
    ref = models.tiny_gpt2()
    for n, d in dirs.items():
        eng.load(n, d)
        lp.load_adapter(ref, d, n, activate=False)
    ids, mask = batch_inputs(4, 5, 1)
    rows = ["g1", None, {"g1": 0.5, "g2": 0.5}, "g2"]
    close(eng.forward(ids, mask, adapters=rows), ref_rows(ref, ids, mask, rows))
    eng.merge("g2")
    close(eng.forward(ids, mask, adapters=rows), ref_rows(ref, ids, mask, rows))
    eng.unmerge()
    prompts = [[5, 6, 7, 8, 9], [10], [11, 12, 13]]  # absolute position embeddings: position_ids must skip padding
    batch = eng.generate(prompts, adapters=rows[:3], max_new_tokens=6, eos_token_id=[])
    for p, a, g in zip(prompts, rows, batch):
        assert eng.generate([p], adapters=[a], max_new_tokens=6, eos_token_id=[])[0].token_ids == g.token_ids


# ---- generation -------------------------------------------------------------------------------------------

class CharTokenizer:
    """A toy tokenizer: token t <-> the letter chr(97 + t % 26)."""

    pad_token_id = None

    def encode(self, text: str) -> list[int]:
        return [ord(c) - 97 + 3 for c in text]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(97 + t % 26) for t in ids)


PROMPTS = [[5, 9, 11, 40, 7], [3], [100, 20, 30], [8, 8, 8, 8, 8, 8, 8, 8]]
ADAPTERS = ["a", None, {"b": 0.6, "c": 0.4}, "d"]


@pytest.mark.parametrize("backend", ["decoder", "hf"])
def test_generate_greedy_batch_equals_each_alone(engine, reference, backend):
    generate = functools.partial(engine.generate, backend=backend)
    batch = generate(PROMPTS, adapters=ADAPTERS, max_new_tokens=10, eos_token_id=[])
    for p, a, g in zip(PROMPTS, ADAPTERS, batch):
        alone = generate([p], adapters=[a], max_new_tokens=10, eos_token_id=[])[0]
        assert g.token_ids == alone.token_ids and len(g.token_ids) == 10
        assert g.finish_reason == "length" and g.prompt_tokens == len(p) and g.adapter == a
        lp.set_active(reference, [] if a is None else a)  # HF's own generate through the LoRA core
        with torch.no_grad():
            hf = reference.generate(torch.tensor([p]), max_new_tokens=10, min_new_tokens=10, do_sample=False,
                                    pad_token_id=0)
        assert hf[0, len(p):].tolist() == g.token_ids
    lp.set_active(reference, [])


@pytest.mark.parametrize("backend", ["decoder", "hf"])
def test_generate_sampling_is_per_row_and_seeded(engine, backend):
    generate = functools.partial(engine.generate, backend=backend)
    kw = dict(max_new_tokens=8, temperature=1.5, eos_token_id=[])
    batch = generate(PROMPTS, adapters=ADAPTERS, seed=[1, 2, 3, 4], **kw)
    for b in range(len(PROMPTS)):
        alone = generate([PROMPTS[b]], adapters=[ADAPTERS[b]], seed=b + 1, **kw)[0]
        assert alone.token_ids == batch[b].token_ids
    greedy = generate(PROMPTS, adapters=ADAPTERS, max_new_tokens=8, eos_token_id=[])
    tiny_p = generate(PROMPTS, adapters=ADAPTERS, top_p=1e-6, seed=0, **kw)  # keeps only the top token
    assert [g.token_ids for g in tiny_p] == [g.token_ids for g in greedy]
    assert [g.token_ids for g in batch] != [g.token_ids for g in greedy]
    mixed = generate(PROMPTS[:2], adapters=ADAPTERS[:2], temperature=[0.0, 2.0], seed=5, max_new_tokens=8,
                     eos_token_id=[])
    assert mixed[0].token_ids == greedy[0].token_ids  # temperature 0 on row 0 only


@pytest.mark.parametrize("backend", ["decoder", "hf"])
def test_generate_stops(engine, backend):
    generate = functools.partial(engine.generate, backend=backend)
    greedy = generate(PROMPTS, adapters=ADAPTERS, max_new_tokens=6, eos_token_id=[])
    eos = greedy[0].token_ids[2]  # make row 0's third token the end of sequence
    out = generate(PROMPTS, adapters=ADAPTERS, max_new_tokens=6, eos_token_id=eos)
    assert out[0].finish_reason == "stop"
    for g, full in zip(out, greedy):
        cut = full.token_ids.index(eos) if eos in full.token_ids else 6
        assert g.token_ids == full.token_ids[:cut]
        assert g.finish_reason == ("stop" if cut < 6 else "length")
    engine.tokenizer = CharTokenizer()
    try:
        text = generate([PROMPTS[1]], adapters=[None], max_new_tokens=6, eos_token_id=[])[0].text
        stop = text[3:5]
        g = generate([PROMPTS[1]], adapters=[None], max_new_tokens=6, eos_token_id=[], stop=[stop])[0]
        assert g.finish_reason == "stop" and g.text == text[: text.find(stop)]
        s = generate(["hello", "ab"], adapters=["a", "b"], max_new_tokens=3, eos_token_id=[])
        assert all(len(x.text) == 3 for x in s)
    finally:
        engine.tokenizer = None
    with pytest.raises(ConfigError):
        generate(["text"], adapters=[None])  # no tokenizer
    with pytest.raises(ShapeMismatchError):
        generate(PROMPTS, adapters=["a"])


# ---- versions, leases, memory ---------------------------------------------------------------------------

def test_replace_under_a_held_lease(adapter_dirs, reference):
    eng = MultiLoraModel(models.tiny_llama())
    h1 = eng.load("a", adapter_dirs["a"])
    ids, mask = batch_inputs(2, 4, 3)
    old = eng.lease("a")
    in_flight = eng.batch(["a", None])  # e.g. a generation that started before the replace
    h2 = eng.replace("a", adapter_dirs["a2"])
    assert h1 != h2 and eng.content_hash("a") == h2
    want_old = ref_rows(reference, ids, mask, ["a", None])
    want_new = ref_rows(reference, ids, mask, ["a2", None])
    close(eng.forward(ids, mask, adapters=[old, None]), want_old)  # the old lease: the old version
    close(in_flight(input_ids=ids, attention_mask=mask).logits, want_old)
    close(eng.forward(ids, mask, adapters=["a", None]), want_new)  # new requests: the new version
    close(eng.forward(ids, mask, adapters=[{old: 1.0}, "a"]), ref_rows(reference, ids, mask, ["a", "a2"]))
    assert eng.stats.adapters == 2
    old.release()
    in_flight.close()
    assert eng.stats.adapters == 1  # the old version is freed with its last lease
    assert eng.load("a", adapter_dirs["a2"]) == h2  # same content again: a no-op
    with pytest.raises(AdapterExistsError):
        eng.load("a", adapter_dirs["a"])  # another content under a taken name needs replace
    with pytest.raises(AdapterNotFoundError):
        eng.replace("zz", adapter_dirs["a"])


def test_memory_budget_eviction_and_reload_give_identical_outputs(adapter_dirs, tmp_path):
    free = MultiLoraModel(models.tiny_llama())
    for n in SPECS:
        free.load(n, adapter_dirs[n])
    sizes = {n: free.pool.tensors(free.pool.slot(n), k) for n in SPECS for k in free.pool.layers}
    budget = max(free.pool.resident_bytes // 2, 1)
    dirs = {n: shutil.copytree(adapter_dirs[n], tmp_path / n) for n in SPECS}
    tight = MultiLoraModel(models.tiny_llama(), memory_budget_bytes=budget)
    for n in SPECS:
        tight.load(n, dirs[n])
    assert tight.pool.resident_bytes <= budget and tight.stats.evictions > 0
    ids, mask = batch_inputs(2, 5, 4)
    for n in list(SPECS) * 2:
        assert torch.equal(tight.forward(ids, mask, adapters=[n, None]), free.forward(ids, mask, adapters=[n, None]))
    st_ = tight.stats
    assert st_.misses > 0 and st_.resident < len(SPECS)
    # an evicted adapter whose file changed on disk is refused, never served stale
    victim = next(n for n in SPECS if not tight.pool.is_resident(n))
    shutil.rmtree(dirs[victim])
    shutil.copytree(adapter_dirs["a2"], dirs[victim])
    with pytest.raises(AdapterFileError, match="replace"):
        tight.forward(ids, mask, adapters=[victim, None])
    del sizes


class OpCounter(TorchDispatchMode):
    """Counts every aten op and the bytes of every tensor they produce."""

    def __init__(self):
        super().__init__()
        self.ops, self.bytes = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.bytes += t.numel() * t.element_size()
        return out


def test_load_cost_does_not_depend_on_the_number_loaded(adapter_dirs, tmp_path):
    """No re-stacking: loading the k-th adapter runs the same ops on the same bytes for any k."""
    eng = MultiLoraModel(models.tiny_llama())
    eng.load("warm", adapter_dirs["a"])  # wraps the layers once
    costs = []
    for k in range(6):
        d = shutil.copytree(adapter_dirs["a"], tmp_path / f"n{k}")
        before = {n: eng.pool.tensors(eng.pool.slot(n), k_)[0].data_ptr() for n in eng.names()
                  for k_ in list(eng.pool.layers)[:1]}
        resident = eng.pool.resident_bytes
        with OpCounter() as c:
            eng.load(f"n{k}", d)
        costs.append((c.ops, c.bytes, eng.pool.resident_bytes - resident))
        after = {n: eng.pool.tensors(eng.pool.slot(n), k_)[0].data_ptr() for n in before
                 for k_ in list(eng.pool.layers)[:1]}
        assert after == before  # the adapters already loaded were not touched
    assert len(set(costs)) == 1, costs


def test_switching_adapters_needs_no_model_mutation(engine):
    def snapshot():
        return ([(n, type(m).__name__) for n, m in engine.model.named_modules()],
                {n: (p.data_ptr(), p._version) for n, p in engine.model.named_parameters()})

    ids, mask = batch_inputs(2, 3, 5)
    engine.forward(ids, mask, adapters=["a", "b"])
    before = snapshot()
    for rows in (["b", "a"], ["c", None], [{"a": 0.5, "d": 0.5}, "d"], [None, None]):
        engine.forward(ids, mask, adapters=rows)
    assert snapshot() == before


# ---- merged mode --------------------------------------------------------------------------------------------

def test_merged_matches_on_the_fly_and_unmerge_restores_the_base(adapter_dirs, reference):
    eng = MultiLoraModel(models.tiny_llama())
    for n in SPECS:
        eng.load(n, adapter_dirs[n])
    weights = {k: v.clone() for k, v in eng.model.state_dict().items()}
    ids, mask = batch_inputs(5, 4, 6)
    rows = ["a", None, "b", {"a": 0.5, "c": 0.5}, "a"]
    on_the_fly = eng.forward(ids, mask, adapters=rows)
    eng.merge("a")
    assert eng.merged == "a"
    assert eng.batch(["a", "a"]).plan is None  # rows asking for the merged adapter cost nothing extra
    close(eng.forward(ids, mask, adapters=rows), on_the_fly)  # other rows are served by subtracting
    close(eng.forward(ids, mask, adapters=rows), ref_rows(reference, ids, mask, rows))
    with pytest.raises(MergeStateError):
        eng.merge("b")
    with pytest.raises(MergeStateError):
        eng.unload("a")
    with pytest.raises(MergeStateError):
        eng.unwrap()
    in_flight = eng.batch(rows)  # opened while merged, used after the unmerge: the plan follows the state
    eng.unmerge()
    close(in_flight(input_ids=ids, attention_mask=mask).logits, on_the_fly)
    in_flight.close()
    assert all(torch.equal(v, weights[k]) for k, v in eng.model.state_dict().items())  # bit for bit
    assert torch.equal(eng.forward(ids, mask, adapters=rows), on_the_fly)
    with pytest.raises(MergeStateError):
        eng.unmerge()


# ---- targets, store, errors ---------------------------------------------------------------------------------

def test_fixed_targets_refuse_other_modules_and_lazy_targets_wrap(adapter_dirs):
    eng = MultiLoraModel(models.tiny_llama(), target_modules=["q_proj", "v_proj"])
    assert all(isinstance(eng.model.get_submodule(k), RuntimeLinear) for k in eng.wrapped) and len(eng.wrapped) == 4
    eng.load("b", adapter_dirs["b"])
    with pytest.raises(TargetNotFoundError, match="target_modules"):
        eng.load("a", adapter_dirs["a"])
    assert "a" not in eng
    lazy = MultiLoraModel(models.tiny_llama())
    assert lazy.wrapped == []
    lazy.load("b", adapter_dirs["b"])
    assert len(lazy.wrapped) == 4
    held = lazy.batch(["b"])  # a plan built before more layers get wrapped
    lazy.load("d", adapter_dirs["d"])
    assert len(lazy.wrapped) == 8
    ids, mask = batch_inputs(1, 3, 7)
    close(held(input_ids=ids, attention_mask=mask).logits, lazy.forward(ids, mask, adapters=["b"]))
    held.close()
    base = lazy.unwrap()
    assert not any(isinstance(m, RuntimeLinear) for m in base.modules())


def test_adapter_store(adapter_dirs, tmp_path):
    store = AdapterStore(tmp_path)
    assert store.put("legal", adapter_dirs["a"]) == lp.read_adapter(adapter_dirs["a"]).content_hash
    store.put("tone", adapter_dirs["b"])
    (tmp_path / ".tone.tmp-x").mkdir()  # an atomic write in progress is never listed
    assert store.names() == ["legal", "tone"] and "legal" in store and "x" not in store
    eng = MultiLoraModel(models.tiny_llama(), store=tmp_path)
    assert eng.load_from_store("legal") == store.content_hash("legal")
    with pytest.raises(AdapterNotFoundError, match="tone"):
        eng.load_from_store("nope")
    new = store.put("legal", adapter_dirs["a2"])  # a new version on disk: the engine notices only on replace
    assert eng.content_hash("legal") != new
    assert eng.replace("legal", store.path("legal")) == new
    store.remove("tone")
    assert store.names() == ["legal"]
    with pytest.raises(AdapterFileError):
        AdapterStore(tmp_path / "missing")
    with pytest.raises(ConfigError):
        MultiLoraModel(models.tiny_llama()).load_from_store("legal")


def test_errors(engine, adapter_dirs, tmp_path):
    ids, mask = batch_inputs(2, 3, 8)
    with pytest.raises(AdapterNotFoundError):
        engine.forward(ids, mask, adapters=["nope", None])
    with pytest.raises(ShapeMismatchError):
        engine.forward(ids, mask, adapters=["a"])
    with pytest.raises(ConfigError):
        engine.forward(ids, mask, adapters=[3, None])
    with pytest.raises(ConfigError):
        engine.batch("a")
    model = models.tiny_llama()
    lp.inject(model, lp.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]), "x")
    lp.save_adapter(model, "x", tmp_path / "mts")
    engine.load("mts", tmp_path / "mts")  # copies serve per row (tests/core/test_variant_rows.py); mixes are refused
    with pytest.raises(UnsupportedFeatureError, match="modules_to_save"):
        engine.forward(ids, mask, adapters=[{"mts": 0.5}, None])
    engine.unload("mts")
    assert engine.stats.adapters == len(SPECS)  # nothing leaked: every lease was released


def test_bfloat16_base(adapter_dirs):
    """Adapters are kept in the model's dtype; bf16 results agree with the LoRA core within the bf16 tolerance."""
    eng = MultiLoraModel(models.tiny_llama().to(torch.bfloat16))
    ref = models.tiny_llama().to(torch.bfloat16)
    for n in ("a", "c"):
        eng.load(n, adapter_dirs[n])
        lp.load_adapter(ref, adapter_dirs[n], n, activate=False)
    assert eng.pool.tensors(eng.pool.slot("a"), eng.wrapped[0])[0].dtype == torch.bfloat16
    ids, mask = batch_inputs(3, 5, 9)
    rows = ["a", None, {"a": 0.5, "c": 0.5}]
    want = ref_rows(ref, ids, mask, rows)
    close(eng.forward(ids, mask, adapters=rows), want)
    eng.merge("c")
    close(eng.forward(ids, mask, adapters=rows), want)
    eng.unmerge()
