"""lora_bias and modules_to_save adapters served per row by the multi-adapter runtime (MultiLoraModel) and the
server (Engine over CompactLlama): PEFT is the oracle (each row alone through PEFT), in random batches mixing
them with plain LoRA, DoRA and base rows, for forward, generate, after eviction and reload, and on a base with
tied embeddings; what has no per-row rule (mixes with copies, merging them) is refused with a typed error."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from peft_helpers import peft_adapter_dir as _peft_dir
import loraplex as lp
import reference_runtime as ref
from loraplex.functional import tolerance
from loraplex.models import tiny_llama
from test_dora import _inputs, _peft_rows

ATOL, RTOL = tolerance(torch.float32)
ADAPTERS = {  # name -> PEFT LoraConfig fields (each written by PEFT, with every trainable tensor moved off its init)
    "plain": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]),
    "bias": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "down_proj"], lora_bias=True,
                 rank_pattern={"down_proj": 2}),
    "copy": dict(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"], modules_to_save=["lm_head", "norm"]),
    "dora": dict(r=4, lora_alpha=8, target_modules=["v_proj", "gate_proj"], use_dora=True),
}


def _base(tied: bool) -> nn.Module:
    return tiny_llama(seed=0, tie_word_embeddings=tied)


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def served(request, tmp_path_factory):
    """(engine, PEFT model holding every adapter, adapter dirs, tied) on tiny_llama with or without tied embeddings."""
    from loraplex.runtime import MultiLoraModel

    tied = request.param
    root = tmp_path_factory.mktemp("tied" if tied else "untied")
    dirs = {n: _peft_dir(root / n, tied, i + 1, **f) for i, (n, f) in enumerate(ADAPTERS.items())}
    eng = MultiLoraModel(_base(tied))
    pm = peft.PeftModel.from_pretrained(_base(tied), dirs["plain"], adapter_name="plain").eval()
    for n, d in dirs.items():
        eng.load(n, d, check_base_model=False)
        if n != "plain":
            pm.load_adapter(d, adapter_name=n)
    return eng, pm, dirs, tied


# ---- ops level ----------------------------------------------------------------------------------------------

ROWS = [-1, 0, 1, 2, 3, ((1, 0.5), (0, -1.0)), ((2, 2.0), (1, 0.25)), ((0, 1.0), (3, 1.0))]


@settings(max_examples=40, deadline=None)
@given(rows=st.lists(st.sampled_from(ROWS), min_size=1, max_size=9),
       strategy=st.sampled_from(["gather", "segment", "auto"]), L=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_plan_adds_each_rows_weighted_lora_b_biases_like_the_reference(rows, strategy, L, seed):
    """Slots 1 and 2 have LoRA-B biases, 0 none, 3 no LoRA on the layer; mixes weight each bias like its B."""
    from loraplex.runtime import build_plan

    gen = torch.Generator().manual_seed(seed)
    fin, fout = 6, 5
    adapters, x, y = ref.random_layer(gen, len(rows), L, fin, fout)
    bias = {1: torch.randn(fout, generator=gen), 2: torch.randn(fout, generator=gen)}
    plan = build_plan(lambda s, k: adapters[s], rows, {"l": (fin, fout)}, dtype=torch.float32, strategy=strategy,
                      bias=lambda s, k: (bias[s], adapters[s][2]) if s in bias else None)
    want = ref.lora_rows_ref(y, x, adapters, rows, bias=bias)
    torch.testing.assert_close(plan.apply_("l", x, y.clone()), want, atol=ATOL, rtol=RTOL)


@settings(max_examples=30, deadline=None)
@given(rows=st.lists(st.sampled_from([-1, 0, 1, 2, ((1, 0.5), (0, 1.0))]), min_size=1, max_size=9),
       seed=st.integers(0, 2**16))
def test_plan_runs_each_rows_module_copy_and_the_base_for_the_others(rows, seed):
    """Slots 0 and 2 hold copies of module "m" (a Linear), 1 none: each row gets its copy's output or the base's."""
    from loraplex.runtime import build_plan
    from loraplex.runtime.saved_modules import RuntimeModulesToSave
    from loraplex.runtime.wrapper import CurrentPlan

    gen = torch.Generator().manual_seed(seed)
    base = nn.Linear(4, 3)
    copies = {s: {"weight": torch.randn(3, 4, generator=gen), "bias": torch.randn(3, generator=gen)} for s in (0, 2)}
    adapters = {s: (torch.randn(1, 4, generator=gen), torch.randn(4, 1, generator=gen), 1.0) for s in (0, 1, 2)}
    current = CurrentPlan(build_plan(lambda s, k: adapters[s], rows, {"l": (4, 4)}, dtype=torch.float32,
                                     saved=lambda s: {"m": copies[s]} if s in copies else {}))
    wrapper = RuntimeModulesToSave(base, "m", current)
    x = torch.randn(len(rows), 2, 4, generator=gen)
    want = []
    for b, a in enumerate(rows):
        slot = next((s for s, _ in ([] if a == -1 else [(a, 1.0)] if isinstance(a, int) else a) if s in copies), None)
        c = copies.get(slot)
        want.append(base(x[b]) if c is None else nn.functional.linear(x[b], c["weight"], c["bias"]))
    with torch.no_grad():
        torch.testing.assert_close(wrapper(x), torch.stack(want), atol=ATOL, rtol=RTOL)
    for bad in ([((0, 0.5),)], [((0, 1.0), (2, 1.0))]):  # a copy at a weight, two copies of one module: no rule
        with pytest.raises(lp.UnsupportedFeatureError, match="modules_to_save copies of 'm'"):
            build_plan(lambda s, k: adapters[s], bad, {"l": (4, 4)}, dtype=torch.float32,
                       saved=lambda s: {"m": copies[s]} if s in copies else {})


# ---- MultiLoraModel --------------------------------------------------------------------------------------------

@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.sampled_from([None, "plain", "bias", "copy", "dora"]), min_size=1, max_size=7),
       seed=st.integers(0, 2**16))
def test_mixed_batch_equals_each_row_alone_in_peft(served, rows, seed):
    eng, pm, _, _ = served
    ids, mask = _inputs(len(rows), 5, seed)
    torch.testing.assert_close(eng.forward(ids, mask, adapters=rows), _peft_rows(pm, ids, mask, rows),
                               atol=ATOL, rtol=RTOL)


def _peft_greedy(pm, prompt, name, n):
    """PEFT's own greedy generate of `n` new tokens for one prompt, adapter `name` (None: disabled), no eos stop."""
    pm.generation_config.eos_token_id = None
    kw = dict(input_ids=torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        if name is None:
            with pm.disable_adapter():
                return pm.generate(**kw)[0, len(prompt):].tolist()
        pm.set_adapter(name)
        return pm.generate(**kw)[0, len(prompt):].tolist()


def test_generate_gives_each_row_peft_greedy_tokens(served):
    eng, pm, _, _ = served
    prompts = [[5, 9, 11, 4], [3, 4], [7, 7, 7], [20, 21, 22, 23, 24], [6], [8, 9]]
    rows = ["copy", "bias", None, "dora", "plain", "copy"]
    out = eng.generate(prompts, adapters=rows, max_new_tokens=6, eos_token_id=[])
    for p, name, g in zip(prompts, rows, out):
        assert g.token_ids == _peft_greedy(pm, p, name, 6), name


def test_eviction_reload_copies_in_the_budget_and_refusals(served):
    """A budget one byte short of all four adapters evicts the least recently used one (its A and B; biases and
    copies stay, counted in the budget) and reloads it to the same outputs; no mix or merge with a copy adapter,
    no merge of a lora_bias adapter, and no module both copied and adapted."""
    from loraplex.runtime import MultiLoraModel

    eng, pm, dirs, tied = served
    rows = ["copy", None, "bias", "plain", "copy", "dora"]
    ids, mask = _inputs(len(rows), 4, 5)
    want = _peft_rows(pm, ids, mask, rows)
    copy_bytes = sum(p.numel() * 4 for n, p in pm.named_parameters() if ".modules_to_save.copy." in n)
    small = MultiLoraModel(_base(tied), memory_budget_bytes=eng.stats.resident_bytes - 1)
    small.load("copy", dirs["copy"], check_base_model=False)
    assert small.stats.resident_bytes > copy_bytes > 0  # the copies count against the budget
    first = small.forward(ids[:2], mask[:2], adapters=rows[:2])
    for n in ("bias", "plain", "dora"):
        small.load(n, dirs[n], check_base_model=False)
    assert not small.pool.is_resident("copy")
    keep = [b for b, r in enumerate(rows) if r != "dora"]  # three of the four adapters fit the budget at once
    torch.testing.assert_close(small.forward(ids[keep], mask[keep], adapters=[rows[b] for b in keep]), want[keep],
                               atol=ATOL, rtol=RTOL)
    assert torch.equal(small.forward(ids[:2], mask[:2], adapters=rows[:2]), first) and small.stats.misses > 0
    for mix in ({"copy": 0.5}, {"copy": 1.0, "plain": 1.0}):
        with pytest.raises(lp.UnsupportedFeatureError, match="modules_to_save copies"):
            eng.forward(ids[:1], mask[:1], adapters=[mix])
    with pytest.raises(lp.UnsupportedFeatureError, match="modules_to_save copies"):
        eng.merge("copy")
    with pytest.raises(lp.UnsupportedFeatureError, match="lora_bias"):
        eng.merge("bias")
    mixed = eng.forward(ids[:1], mask[:1], adapters=[{"bias": 0.5, "plain": -1.0}])  # biases mix like B: allowed
    assert torch.isfinite(mixed).all()
    eng.merge("plain")  # a merged plain adapter is taken back out of copy and bias rows
    try:  # merged weights round W + s*B@A once: an error that scales with the logits, hence atol x their size
        torch.testing.assert_close(eng.forward(ids, mask, adapters=rows), want,
                                   atol=ATOL * max(1.0, want.abs().max().item()), rtol=RTOL)
    finally:
        eng.unmerge()
    before = small.stats.adapters
    model = _base(tied)  # LoRA on lm_head, which "copy" holds a copy of
    lp.inject(model, lp.LoraConfig(r=2, target_modules=["q_proj", "lm_head"], init_lora_weights=False), "x")
    clash = lp.save_adapter(model, "x", dirs["copy"].parent / "lora-head").path
    with pytest.raises(lp.UnsupportedFeatureError, match="either copied or adapted"):
        small.load("lora-head", clash, check_base_model=False)
    assert small.stats.adapters == before and "lora-head" not in small


def test_copies_are_evicted_and_reloaded_like_a_and_b(served):
    """A budget that holds one copy adapter at a time: loading a second evicts the first's copies with its A and B,
    and each one serves PEFT's outputs again after its reload (from the directory, checked by content)."""
    from loraplex.runtime import MultiLoraModel

    eng, pm, dirs, tied = served
    one = MultiLoraModel(_base(tied))
    one.load("copy", dirs["copy"], check_base_model=False)
    budget = one.stats.resident_bytes
    small = MultiLoraModel(_base(tied), memory_budget_bytes=budget + budget // 2)
    small.load("copy", dirs["copy"], check_base_model=False)
    small.load("again", dirs["copy"], check_base_model=False)  # the same file under a second name: its own slot
    assert not small.pool.is_resident("copy") and small.stats.resident_bytes <= budget + budget // 2
    ids, mask = _inputs(3, 4, 7)
    want = _peft_rows(pm, ids, mask, ["copy", None, "copy"])
    for name in ("copy", "again", "copy"):
        torch.testing.assert_close(small.forward(ids, mask, adapters=[name, None, name]), want, atol=ATOL, rtol=RTOL)
    assert small.stats.evictions >= 3 and small.stats.misses >= 2


def test_unwrap_puts_the_copied_modules_back(served, tmp_path):
    from loraplex.runtime import MultiLoraModel

    _, _, dirs, tied = served
    base = _base(tied)
    head, norm = base.lm_head, base.model.norm
    eng = MultiLoraModel(base)
    eng.load("copy", dirs["copy"], check_base_model=False)
    assert base.lm_head is not head
    eng.unwrap()
    assert base.lm_head is head and base.model.norm is norm
    if tied:  # the copy never touched the tied embedding
        assert base.lm_head.weight is base.model.embed_tokens.weight


# ---- the server ------------------------------------------------------------------------------------------------

def _server(root, tied):
    from loraplex.runtime import AdapterPool
    from loraplex.serve import CompactLlama, Engine, EngineConfig
    from loraplex.serve.adapters import ServedAdapters
    from loraplex.serve.text import TextCodec

    hf = _base(tied)
    model = CompactLlama(hf)
    pool = AdapterPool(model.layer_shapes(), dtype=model.dtype)
    store = ServedAdapters(root, pool, hf, reserved={"base"}, check_base_model=False)
    for n in ADAPTERS:
        store.load(n)
    return Engine(model, pool, TextCodec.for_model(None, hf.config), base_ids=("base",),
                  config=EngineConfig(max_batch=4, max_prompt_tokens=32, max_new_tokens=16)), store


def test_server_gives_each_request_peft_greedy_tokens(served):
    """Continuous batching of copy, bias, DoRA, plain and base requests (more than fit one batch): each request's
    greedy tokens are PEFT's; the decoder's logits of a copy row equal PEFT's; mixes with copies refused at submit."""
    from loraplex.serve import SamplingParams

    _, pm, dirs, tied = served
    eng, _ = _server(dirs["plain"].parent, tied)
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    jobs = [([5, 9, 11], "copy"), ([3, 4], "bias"), ([7, 7, 7, 7], "base"), ([20, 21], "dora"), ([6, 5], "plain"),
            ([8, 8, 9], "copy"), ([30], "bias")]
    handles = [eng.submit(p, m, greedy) for p, m in jobs]
    while not all(h.done for h in handles):
        eng.step()
    for (p, m), h in zip(jobs, handles):
        assert h.result().token_ids == _peft_greedy(pm, p, None if m == "base" else m, 6), m
    ids = torch.randint(3, 128, (3, 5), generator=torch.Generator().manual_seed(1))
    rows = ["copy", "bias", None]
    plan = eng.pool.plan([eng.pool.slot(n) if n else -1 for n in rows])
    torch.testing.assert_close(eng.model.logits(ids, plan), _peft_rows(pm, ids, torch.ones_like(ids), rows),
                               atol=ATOL, rtol=RTOL)
    for spec in ("copy:0.5", "copy+plain"):
        with pytest.raises(lp.UnsupportedFeatureError, match="modules_to_save copies"):
            eng.submit([5], spec, greedy)


def test_server_prompt_logprobs_use_the_rows_lm_head_copy(served):
    from loraplex.serve import SamplingParams

    _, pm, dirs, tied = served
    eng, _ = _server(dirs["plain"].parent, tied)
    prompt = [5, 9, 11, 4]
    h = eng.submit(prompt, "copy", SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0))
    while not h.done:
        eng.step()
    pm.set_adapter("copy")
    with torch.no_grad():
        want = pm(torch.tensor([prompt])).logits[0].log_softmax(-1)  # (L, V)
    got = [t.logprob for t in h.result().prompt_logprobs[1:]]
    torch.testing.assert_close(torch.tensor(got), want[torch.arange(3), torch.tensor(prompt[1:])],
                               atol=1e-4, rtol=1e-4)  # logprobs pass through float32 log_softmax on both sides


def test_server_refuses_a_copy_the_decoder_has_no_place_for(served, tmp_path):
    """modules_to_save=["embed_tokens"]: the compact decoder has no per-row embedding copy: refused at load."""
    _, _, dirs, tied = served
    _peft_dir(tmp_path / "emb", tied, 3, r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens"])
    eng, store = _server(dirs["plain"].parent, tied)
    store.directory = tmp_path
    with pytest.raises(lp.UnsupportedFeatureError, match="no per-row place"):
        store.load("emb")
    assert "emb" not in eng.pool


def test_tied_copies_of_ensure_weight_tying_are_refused(tmp_path):
    """PEFT's ensure_weight_tying=true on a tied base saves an embed_tokens copy with lm_head tied to it: no
    per-row form in the runtime, refused at load by the engine and the server's reader, nothing kept."""
    from loraplex.runtime import MultiLoraModel
    from loraplex.runtime.decoder import saved_places
    from loraplex.runtime.slots import pool_tensors

    _peft_dir(tmp_path / "t", True, 4, r=2, target_modules=["q_proj"], modules_to_save=["lm_head"],
              ensure_weight_tying=True)
    eng = MultiLoraModel(_base(True))
    with pytest.raises(lp.UnsupportedFeatureError, match="ensure_weight_tying"):
        eng.load("t", tmp_path / "t", check_base_model=False)
    assert eng.stats.adapters == 0 and not eng.wrapped
    hf = _base(True)
    with pytest.raises(lp.UnsupportedFeatureError, match="ensure_weight_tying"):
        pool_tensors(lp.read_adapter(tmp_path / "t"), {}, hf.get_submodule, saved_places(hf))


def test_gpt2_conv1d_bias_and_layernorm_copy_rows_equal_peft(tmp_path):
    """GPT-2 (Conv1D projections with biases, fan_in_fan_out): a lora_bias adapter on c_attn/c_fc and an adapter
    holding a copy of ln_f (a LayerNorm: weight and bias), mixed with base rows, equal PEFT row by row."""
    from loraplex.runtime import MultiLoraModel
    from test_dora import gpt2_biased

    specs = {"b": dict(r=4, target_modules=["c_attn", "c_fc"], lora_bias=True, fan_in_fan_out=True),
             "c": dict(r=2, target_modules=["c_proj"], modules_to_save=["ln_f"], fan_in_fan_out=True)}
    for i, (n, kw) in enumerate(specs.items()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = peft.get_peft_model(gpt2_biased(seed=0), peft.LoraConfig(init_lora_weights=False, **kw))
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for _, p in pm.named_parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=gen) * 0.1)
        pm.save_pretrained(tmp_path / n)
    eng = MultiLoraModel(gpt2_biased(seed=0))
    pm = peft.PeftModel.from_pretrained(gpt2_biased(seed=0), tmp_path / "b", adapter_name="b").eval()
    pm.load_adapter(tmp_path / "c", adapter_name="c")
    for n in specs:
        eng.load(n, tmp_path / n, check_base_model=False)
    rows = ["b", "c", None, "c", "b"]
    ids, mask = _inputs(len(rows), 5, 1)
    torch.testing.assert_close(eng.forward(ids, mask, adapters=rows), _peft_rows(pm, ids, mask, rows),
                               atol=ATOL, rtol=RTOL)


def test_bf16_engine_bias_and_copy_rows_agree_with_the_core(served):
    """A bf16 engine keeps biases and copies in bf16; its rows agree with the LoRA core over the bf16 base (one
    adapter active per row) within the bf16 tolerance."""
    from loraplex.runtime import MultiLoraModel

    _, _, dirs, tied = served
    eng = MultiLoraModel(_base(tied).to(torch.bfloat16))
    ref = _base(tied).to(torch.bfloat16)
    for n in ("bias", "copy"):
        eng.load(n, dirs[n], check_base_model=False)
        lp.load_adapter(ref, dirs[n], n, check_base_model=False, activate=False)
    rows = ["copy", "bias", None, "copy"]
    ids, mask = _inputs(len(rows), 5, 4)
    want = []
    with torch.no_grad():
        for b, name in enumerate(rows):
            lp.set_active(ref, [] if name is None else name)
            want.append(ref(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1]).logits)
    atol, rtol = tolerance(torch.bfloat16)
    torch.testing.assert_close(eng.forward(ids, mask, adapters=rows), torch.cat(want), atol=atol, rtol=rtol)


def test_dora_with_lora_bias_is_refused_as_peft_refuses_it(served, tmp_path):
    """PEFT's LoraConfig refuses lora_bias with use_dora; a file claiming both is refused when read, by the engine
    and by the server's adapters, nothing kept."""
    import json
    import shutil

    from loraplex.runtime import MultiLoraModel
    from loraplex.store import CONFIG_NAME

    _, _, dirs, tied = served
    with pytest.raises(ValueError, match="not supported for DoRA"):
        peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True, lora_bias=True)
    shutil.copytree(dirs["bias"], tmp_path / "both")
    cfg = json.loads((tmp_path / "both" / CONFIG_NAME).read_text())
    (tmp_path / "both" / CONFIG_NAME).write_text(json.dumps(cfg | {"use_dora": True}))
    eng, store = _server(dirs["plain"].parent, tied)
    store.directory = tmp_path
    with pytest.raises(lp.UnsupportedFeatureError, match="lora_bias=true with use_dora"):
        store.load("both")
    assert "both" not in eng.pool
    engine = MultiLoraModel(_base(tied))
    with pytest.raises(lp.UnsupportedFeatureError, match="PEFT refuses it too"):
        engine.load("both", tmp_path / "both", check_base_model=False)
    assert engine.stats.adapters == 0


def test_an_embed_tokens_copy_serves_per_row_in_the_hf_path(served, tmp_path):
    """modules_to_save=["embed_tokens"] (PEFT copies the embedding alone; on a tied base lm_head stays the base's):
    MultiLoraModel's rows equal PEFT's (the compact decoder refuses it: see the test above)."""
    from loraplex.runtime import MultiLoraModel

    _, _, _, tied = served
    d = _peft_dir(tmp_path / "emb", tied, 3, r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens"])
    pm = peft.PeftModel.from_pretrained(_base(tied), d, adapter_name="emb").eval()
    eng = MultiLoraModel(_base(tied))
    eng.load("emb", d, check_base_model=False)
    rows = ["emb", None, "emb", None]
    ids, mask = _inputs(len(rows), 5, 2)
    torch.testing.assert_close(eng.forward(ids, mask, adapters=rows), _peft_rows(pm, ids, mask, rows),
                               atol=ATOL, rtol=RTOL)


def test_merging_a_lora_bias_adapter_adds_its_bias_and_unmerge_restores_bit_for_bit(tmp_path):
    """On a base with biases, merge("bias") adds scale * B A into W and scale * b into the base bias (PEFT's merge);
    every row still equals PEFT alone (other adapters' rows take it back out, exactly up to rounding), a DoRA
    adapter loaded meanwhile gets its terms from the bare bias, and unmerge restores weights and biases bit for bit."""
    from loraplex.runtime import MultiLoraModel

    def build():
        return tiny_llama(seed=0, attention_bias=True, mlp_bias=True)

    specs = {"bias": ADAPTERS["bias"], "plain": ADAPTERS["plain"],
             "dora": dict(r=2, target_modules=["q_proj", "down_proj"], use_dora=True)}
    dirs = {}
    for i, (n, f) in enumerate(specs.items()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = peft.get_peft_model(build(), peft.LoraConfig(init_lora_weights=False, **f))
        gen = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for _, p in pm.named_parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=gen) * 0.1)
        pm.save_pretrained(tmp_path / n)
        dirs[n] = tmp_path / n
    pm = peft.PeftModel.from_pretrained(build(), dirs["bias"], adapter_name="bias").eval()
    for n in ("plain", "dora"):
        pm.load_adapter(dirs[n], adapter_name=n)
    eng = MultiLoraModel(build())
    eng.load("bias", dirs["bias"], check_base_model=False)
    eng.load("plain", dirs["plain"], check_base_model=False)
    before = {k: v.clone() for k, v in eng.model.state_dict().items()}
    rows = ["bias", None, "plain", "bias", "dora"]
    ids, mask = _inputs(len(rows), 5, 8)
    want = _peft_rows(pm, ids, mask, rows)
    eng.merge("bias")
    assert any(not torch.equal(v, before[k]) for k, v in eng.model.state_dict().items() if k.endswith(".bias"))
    eng.load("dora", dirs["dora"], check_base_model=False)  # while merged: g and c from the bare W and bias
    torch.testing.assert_close(eng.forward(ids, mask, adapters=rows), want, atol=ATOL, rtol=RTOL)
    eng.unmerge()
    for k, v in eng.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    torch.testing.assert_close(eng.forward(ids, mask, adapters=rows), want, atol=ATOL, rtol=RTOL)
