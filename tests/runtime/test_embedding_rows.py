"""Embedding LoRA and trainable tokens per row (issue #19): PEFT is the oracle. Random mixed batches of base
rows, plain LoRA, embedding LoRA and trainable-tokens adapters equal each row run alone through PEFT, in
MultiLoraModel (forward, generate, eviction and reload) and in the server's Engine (greedy tokens)."""

from __future__ import annotations

import peft
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import loraplex as lp
from loraplex.functional import tolerance
from loraplex.models import tiny_llama
from lora_helpers import move_off_init

ATOL, RTOL = tolerance(torch.float32)
ADAPTERS = {  # name -> PEFT LoraConfig fields
    "plain": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]),
    "emb": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "o_proj"], rank_pattern={"embed_tokens": 3}),
    "tok": dict(r=2, lora_alpha=4, target_modules=["k_proj"], trainable_token_indices=[3, 5, 40, 77]),
    "tok2": dict(r=2, lora_alpha=4, target_modules=["down_proj"], trainable_token_indices={"embed_tokens": [5, 9]}),
}


def _base(tied: bool):
    return tiny_llama(seed=0, tie_word_embeddings=tied)


def _write(root, tied):
    """Each adapter written by PEFT on the tiny Llama (tied or untied head); {name: directory}."""
    dirs = {}
    for i, (name, fields) in enumerate(ADAPTERS.items()):
        pm = peft.get_peft_model(_base(tied), peft.LoraConfig(init_lora_weights=False, **fields))
        move_off_init(pm, i + 1)  # 0.1 sd: merged mode's rounding grows with |scale B A|; its fp32 bound is for that
        pm.save_pretrained(root / name)
        dirs[name] = root / name / "default" if (root / name / "default").exists() else root / name
    return dirs


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def served(request, tmp_path_factory):
    """(engine, {name: PEFT model of that adapter alone, None: the bare base}, directories, tied). One PEFT model
    per adapter: PEFT refuses trainable tokens on an embedding that another adapter's LoRA wraps."""
    from loraplex.runtime import MultiLoraModel

    tied = request.param
    dirs = _write(tmp_path_factory.mktemp("tied" if tied else "untied"), tied)
    eng = MultiLoraModel(_base(tied))
    oracles = {None: _base(tied).eval()}
    for n, d in dirs.items():
        eng.load(n, d)
        oracles[n] = peft.PeftModel.from_pretrained(_base(tied), d).eval()
    return eng, oracles, dirs, tied


def _peft_rows(oracles, ids, mask, rows):
    """Each request alone through PEFT with its adapter (None: the bare base)."""
    with torch.no_grad():
        return torch.cat([oracles[name](input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1]).logits
                          for b, name in enumerate(rows)])


def _inputs(B, T, seed):
    """ids drawn so the trainable tokens (3, 5, 9, 40, 77) occur often; left padding."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (B, T), generator=gen)
    hot = torch.tensor([3, 5, 9, 40, 77])
    pick = torch.rand(B, T, generator=gen) < 0.4
    ids[pick] = hot[torch.randint(0, 5, (int(pick.sum()),), generator=gen)]
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    return ids, (torch.arange(T)[None, :] >= (T - lengths)[:, None]).long()


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.sampled_from([None, *ADAPTERS]), min_size=1, max_size=7), seed=st.integers(0, 2**16))
def test_mixed_batch_equals_each_row_alone_in_peft(served, rows, seed):
    eng, pm, _, _ = served
    ids, mask = _inputs(len(rows), 6, seed)
    got = eng.forward(ids, mask, adapters=rows)
    torch.testing.assert_close(got, _peft_rows(pm, ids, mask, rows), atol=ATOL, rtol=RTOL)


def _greedy(model, prompt, n):
    """n greedy tokens of `model` (a PEFT model or the bare base) for `prompt`, by full forwards (no cache)."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt):].tolist()


JOBS = [([5, 9, 11], "tok"), ([3, 4], "plain"), ([7, 40, 7, 77], None), ([5, 3], "emb"), ([9, 9, 5], "tok2"),
        ([77, 3, 40], "tok")]


def test_generate_rows_equal_peft_greedy(served):
    """MultiLoraModel.generate: a mixed batch's greedy tokens are each row's PEFT greedy tokens (up to eos, which
    generate does not report)."""
    eng, oracles, _, _ = served
    out = eng.generate([p for p, _ in JOBS], adapters=[a for _, a in JOBS], max_new_tokens=6)
    for (p, a), g in zip(JOBS, out):
        want = _greedy(oracles[a], p, 6)
        if 2 in want:
            want = want[: want.index(2)]
        assert g.token_ids == want, a


def test_eviction_and_reload_serve_the_same_rows(served):
    """A budget one byte short of every adapter: loading evicts the least recently used, which reloads (from its
    directory, trainable tokens recomputed against the bare base) to the same outputs."""
    from loraplex.runtime import MultiLoraModel

    eng, oracles, dirs, tied = served
    rows = ["tok", None, "emb", "plain", "tok2", "tok"]
    ids, mask = _inputs(len(rows), 5, 11)
    want = _peft_rows(oracles, ids, mask, rows)
    small = MultiLoraModel(_base(tied), memory_budget_bytes=eng.stats.resident_bytes - 1)
    for n in ["tok", "emb", "plain", "tok2"]:
        small.load(n, dirs[n])
    assert not small.pool.is_resident("tok")
    torch.testing.assert_close(small.forward(ids[:2], mask[:2], adapters=rows[:2]), want[:2], atol=ATOL, rtol=RTOL)
    assert small.stats.misses > 0
    small.forward(ids[2:5], mask[2:5], adapters=rows[2:5])  # evicts "tok" again
    torch.testing.assert_close(small.forward(ids, mask, adapters=rows[:1] * 6)[0], want[0], atol=ATOL, rtol=RTOL)


def test_mixes_add_weighted_changes(served):
    """A mix adds each adapter's weighted change, trainable tokens included: {tok: 1, emb: 1} on the embedding is
    tok's rows plus emb's LoRA; {tok: 0.5} is halfway between the base and tok (embedding and tied head)."""
    eng, oracles, _, tied = served
    ids = torch.tensor([[3, 5, 8, 40, 77, 9]])
    emb = eng.model.get_input_embeddings()
    with eng.batch([{"tok": 0.5}]) as b:
        b(input_ids=ids)  # sets the plan on the wrappers while it runs; check the embedding alone below
        half = emb(ids)
    assert torch.equal(half, emb.base_layer(ids))  # outside a batch: the bare embedding
    plan = eng.pool.plan([[(eng.pool.slot("tok"), 0.5)]])
    y = emb.base_layer(ids).clone()
    plan.embeddings["model.embed_tokens"].apply_(ids, y)
    full = oracles["tok"].get_input_embeddings()(ids)
    torch.testing.assert_close(y, (emb.base_layer(ids) + full) / 2, atol=ATOL, rtol=RTOL)
    assert ("lm_head" in plan.layers and plan.layers["lm_head"] is not None) == tied


def test_what_has_no_row_wise_form_is_refused(served, tmp_path):
    """Merging an embedding adapter is refused (the runtime merges into Linear/Conv1D weights only), a merged plain
    adapter is taken back out of embedding and token rows; combine refuses trainable tokens (it has no rule for
    them); a file with trainable tokens for a module that is no embedding of the base is refused; nothing kept."""
    import json

    from loraplex.store import CONFIG_NAME, WEIGHTS_NAME
    from safetensors.torch import load_file, save_file

    from loraplex.workflows.combine import combine

    eng, oracles, dirs, _ = served
    with pytest.raises(lp.UnsupportedFeatureError, match="cannot merge into 'model.embed_tokens'"):
        eng.merge("emb")
    assert eng.merged is None
    rows = ["tok", "plain", None, "emb", "tok2"]
    ids, mask = _inputs(len(rows), 5, 4)
    eng.merge("plain")  # the other rows subtract it: embedding and token rows stay exact
    try:
        torch.testing.assert_close(eng.forward(ids, mask, adapters=rows), _peft_rows(oracles, ids, mask, rows),
                                   atol=ATOL, rtol=RTOL)
    finally:
        eng.unmerge()
    with pytest.raises(lp.UnsupportedFeatureError, match="trainable_tokens_delta"):
        combine([dirs["tok"], dirs["tok"]], [0.5, 0.5], "cat")
    bad = tmp_path / "bad"
    bad.mkdir()
    t = load_file(dirs["tok"] / WEIGHTS_NAME)
    t = {k.replace("model.embed_tokens", "model.norm"): v for k, v in t.items()}
    save_file(t, bad / WEIGHTS_NAME)
    cfg = json.loads((dirs["tok"] / CONFIG_NAME).read_text())
    (bad / CONFIG_NAME).write_text(json.dumps(cfg))
    before = eng.stats.adapters
    with pytest.raises(lp.LoraplexError, match="model.norm"):
        eng.load("bad", bad)
    assert eng.stats.adapters == before and "bad" not in eng


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_server_engine_greedy_tokens_equal_peft(tied, tmp_path):
    """The compact decoder's engine, adapters loaded from a folder (ServedAdapters): continuous batching of base,
    LoRA, embedding-LoRA and trainable-tokens requests gives each PEFT's greedy tokens; the prompt logprobs use
    the row's head (a tied head's trainable tokens); after an eviction the adapter reloads to the same tokens."""
    from loraplex.runtime import AdapterPool
    from loraplex.serve import CompactLlama, Engine, EngineConfig, SamplingParams
    from loraplex.serve.adapters import ServedAdapters
    from loraplex.serve.text import TextCodec

    dirs = _write(tmp_path, tied)
    oracles = {None: _base(tied).eval(), **{n: peft.PeftModel.from_pretrained(_base(tied), d).eval()
                                            for n, d in dirs.items()}}

    def engine(budget=None):
        hf = _base(tied)
        model = CompactLlama(hf)
        pool = AdapterPool(model.layer_shapes(), dtype=model.dtype, budget_bytes=budget)
        for key, (vocab, dim) in model.embedding_shapes().items():
            pool.register_layer(key, vocab, dim, embedding=True)
        store = ServedAdapters(tmp_path, pool, hf, reserved={"base"})
        for n in dirs:
            store.load(n)
        return Engine(model, pool, TextCodec.for_model(None, hf.config), base_ids=("base",),
                      config=EngineConfig(max_batch=4, max_prompt_tokens=32, max_new_tokens=16)), store

    eng, _ = engine()
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    handles = [eng.submit(p, a or "base", greedy) for p, a in JOBS]
    while not all(h.done for h in handles):
        eng.step()
    for (p, a), h in zip(JOBS, handles):
        assert h.result().token_ids == _greedy(oracles[a], p, 6), a
    with torch.no_grad():
        ids = torch.tensor([[5, 3, 40, 77, 9]])
        want = torch.log_softmax(oracles["tok"](input_ids=ids).logits[0, :-1], -1)
    res = eng.generate(ids[0].tolist(), "tok", SamplingParams(max_tokens=1, prompt_logprobs=0))
    got = torch.tensor([e.logprob for e in res.prompt_logprobs[1:]])
    torch.testing.assert_close(got, want[torch.arange(4), ids[0, 1:]], atol=ATOL, rtol=RTOL)
    small, _ = engine(budget=eng.pool.resident_bytes - 1)
    assert not all(small.pool.is_resident(n) for n in dirs)
    for p, a in JOBS:
        assert small.generate(p, a or "base", greedy).token_ids == _greedy(oracles[a], p, 6), a
    assert small.pool.stats.misses > 0


@settings(max_examples=40, deadline=None)
@given(ids=st.lists(st.integers(-3, 300), min_size=0, max_size=6), as_dict=st.booleans())
def test_config_accepts_distinct_ids_and_round_trips_else_refuses(ids, as_dict):
    """LoraConfig.trainable_token_indices: a non-empty list of distinct ids >= 0 (or {module: such a list}) is kept
    and round-trips through the PEFT config dict; anything else is a typed error ([] means none, as in PEFT; a dict
    entry without ids is refused)."""
    value = {"embed_tokens": ids} if as_dict else ids
    if ids and len(set(ids)) == len(ids) and min(ids) >= 0:
        cfg = lp.LoraConfig(target_modules=["q_proj"], trainable_token_indices=value)
        assert lp.LoraConfig.from_dict(cfg.to_dict()).trainable_token_indices == value
        keep = ("target_modules", "trainable_token_indices")
        peft.LoraConfig(**{k: v for k, v in cfg.to_dict().items() if k in keep})
    elif not ids and not as_dict:
        assert lp.LoraConfig(target_modules=["q_proj"], trainable_token_indices=value).trainable_token_indices is None
    else:
        with pytest.raises(lp.ConfigError, match="distinct token ids"):
            lp.LoraConfig(target_modules=["q_proj"], trainable_token_indices=value)


def test_token_files_that_do_not_add_up_are_refused(served, tmp_path):
    """Rows for more than one module, rows that do not match the ids, rows without the config key: typed errors
    from every reader (read_adapter's token_rows, the runtime, the server's pool_tensors)."""
    import dataclasses

    from loraplex.runtime.slots import pool_tensors
    from loraplex.tokens import token_rows

    eng, _, dirs, _ = served
    af = lp.read_adapter(dirs["tok"])
    key = next(k for k in af.tensors if k.endswith("trainable_tokens_delta"))
    short = dataclasses.replace(af, tensors={**af.tensors, key: af.tensors[key][:2]})
    with pytest.raises(lp.ShapeMismatchError, match="one per id"):
        token_rows(short)
    with pytest.raises(lp.ShapeMismatchError, match="one per id"):
        eng.load("short", short)
    with pytest.raises(lp.ConfigError, match="needs the base model"):
        pool_tensors(af, {})
    plain = lp.read_adapter(dirs["plain"])
    stray = dataclasses.replace(plain, tensors={**plain.tensors, key: af.tensors[key]})
    with pytest.raises(lp.AdapterFileError, match="sets no trainable_token_indices"):
        token_rows(stray)
    assert "short" not in eng and "stray" not in eng


@settings(max_examples=30, deadline=None)
@given(ranks=st.lists(st.integers(1, 5), min_size=1, max_size=4),
       rows=st.lists(st.one_of(st.integers(-1, 3), st.lists(st.tuples(st.integers(0, 3), st.floats(-2, 2)),
                                                             max_size=3)), min_size=1, max_size=6),
       L=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_plan_embedding_rows_equal_the_reference(ranks, rows, L, seed):
    """AdapterPool.plan(...).embeddings over random slots (own ranks; slot 0 has no embedding LoRA), single
    adapters, weighted mixes and base rows equals the slow per-row loop of tests/reference_runtime.py."""
    from reference_runtime import embedding_rows_ref

    from loraplex.runtime import AdapterPool

    gen = torch.Generator().manual_seed(seed)
    vocab, dim = 11, 6
    pool = AdapterPool({"q": (dim, dim)})
    pool.register_layer("emb", vocab, dim, embedding=True)
    factors = {}
    for s, r in enumerate(ranks):
        A, B = torch.randn(r, vocab, generator=gen), torch.randn(dim, r, generator=gen)
        scale = float(torch.rand((), generator=gen)) + 0.5
        layers = {"q": (torch.randn(r, dim, generator=gen), torch.randn(dim, r, generator=gen))}
        if s > 0:
            layers["emb"], factors[s] = (A, B), (A, B, scale)
        assert pool.add(f"a{s}", f"h{s}", layers, {k: scale for k in layers}) == s
    rows = [(a if a < len(ranks) else -1) if isinstance(a, int) else [(s % len(ranks), w) for s, w in a] for a in rows]
    ids = torch.randint(0, vocab, (len(rows), L), generator=gen)
    y = torch.randn(len(rows), L, dim, generator=gen)
    want = embedding_rows_ref(y, ids, {s: factors.get(s) for s in range(len(ranks))}, rows)
    plan = pool.plan(rows)
    got = y.clone()
    if "emb" in plan.embeddings:
        plan.embeddings["emb"].apply_(ids, got)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
