"""loraplex.serve without HTTP: the compact Llama against transformers (+ loraplex inject as the LoRA oracle),
continuous batching against each request run alone, scheduling, limits, replacement and shutdown.

Every comparison of logits uses functional.tolerance(dtype); greedy token sequences are compared exactly.
"""

from __future__ import annotations

import threading

import pytest
import torch
import transformers
from serve_helpers import make_adapter

import loraplex as lp
from loraplex import models
from loraplex.errors import (AdapterExistsError, AdapterFileError, AdapterNotFoundError, BaseMismatchError, ConfigError,
                             LoraplexError, PoolFullError, QueueFullError, RequestTimeoutError, RequestTooLargeError,
                             ShuttingDownError, TargetNotFoundError, UnsupportedFeatureError)
from loraplex.functional import tolerance
from loraplex.runtime import AdapterPool
from loraplex.serve import CompactLlama, Engine, EngineConfig, SamplingParams
from loraplex.serve.adapters import ServedAdapters
from loraplex.serve.metrics import Metrics
from loraplex.serve.text import Detokenizer, TextCodec

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    atol, rtol = tolerance(a.dtype)
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def build(tmp_path, names=(), *, budget=None, **cfg):
    """(hf base, engine, store) over tiny_llama(0) with adapters names[i] made with seed i + 1."""
    for i, n in enumerate(names):
        make_adapter(tmp_path / n, seed=i + 1)
    hf = models.tiny_llama(seed=0)
    model = CompactLlama(hf)
    pool = AdapterPool(model.layer_shapes(), budget_bytes=budget, dtype=model.dtype, max_plans=16)
    metrics = Metrics()
    store = ServedAdapters(tmp_path, pool, hf, reserved={"tiny-llama", "base"}, metrics=metrics)
    for n in names:
        store.load(n)
    config = EngineConfig(**{"max_batch": 4, "max_prompt_tokens": 48, "max_new_tokens": 32, **cfg})
    engine = Engine(model, pool, TextCodec.for_model(None, hf.config), base_ids=("tiny-llama", "base"),
                    config=config, metrics=metrics, on_step=store.poll_evictions)
    return hf, engine, store


def hf_with(tmp_path, active) -> torch.nn.Module:
    """tiny_llama(0) with loraplex's on-the-fly adapters loaded and `active` set (the oracle)."""
    m = models.tiny_llama(seed=0)
    names = [active] if isinstance(active, str) else list(active)
    for n in names:
        lp.load_adapter(m, tmp_path / n, n, activate=False)
    lp.set_active(m, active)
    return m


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(ids).logits[0, -1].argmax())
            out.append(t)
            ids = torch.cat([ids, torch.tensor([[t]])], dim=1)
    return out


def solo(tmp_path, names, prompt, model, params=GREEDY):
    _, eng, _ = build(tmp_path / "solo", names)
    return eng.generate(prompt, model, params)


# ---- the compact model against transformers ----------------------------------------------------------------
def _tiny(arch: str, **over):
    fields = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    config = getattr(transformers, f"{arch}Config")(**{**fields, **over})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return getattr(transformers, f"{arch}ForCausalLM")(config).eval()


@pytest.mark.parametrize("arch,over", [("Llama", {}), ("Llama", {"tie_word_embeddings": True, "num_key_value_heads": 4}),
                                       ("Qwen2", {}), ("Mistral", {"sliding_window": 64})])
def test_compact_logits_equal_transformers(arch, over):
    hf = _tiny(arch, **over)
    model = CompactLlama(hf)
    ids = torch.randint(3, 128, (3, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
    close(model.logits(ids), ref)
    # prefill into lanes [2, 0, 1] with ragged lengths, then one decode step per lane
    cache = model.new_cache(max_lanes=3, max_len=32)
    lengths = torch.tensor([13, 6, 9])
    last = model.prefill(ids, lengths, cache, [2, 0, 1])
    for b in range(3):
        close(last[b], ref[b, lengths[b] - 1] if lengths[b] == 13 else hf(ids[b:b + 1, :lengths[b]]).logits[0, -1])
    nxt = torch.tensor([7, 8, 9])
    lane_rows = [1, 2, 0]  # lane -> row of `ids`
    step = model.decode(nxt[lane_rows], lengths[lane_rows], cache)
    for lane, b in enumerate(lane_rows):
        full = torch.cat([ids[b, :lengths[b]], nxt[b:b + 1]])[None]
        with torch.no_grad():
            close(step[lane], hf(full).logits[0, -1])


def test_compact_refuses_what_it_does_not_implement():
    with pytest.raises(UnsupportedFeatureError, match="model_type"):
        CompactLlama(models.tiny_gpt2(seed=0))
    hf = models.tiny_llama(seed=0)
    lp.inject(hf, lp.LoraConfig(r=2, target_modules=["q_proj"]), "x")
    with pytest.raises(UnsupportedFeatureError, match="nn.Linear"):
        CompactLlama(hf)


def test_compact_with_adapters_equals_inject_on_the_fly(tmp_path):
    hf, eng, store = build(tmp_path, ["legal", "tone"])
    ids = torch.randint(3, 128, (1, 11), generator=torch.Generator().manual_seed(2))
    for spec, active in [("legal", "legal"), ("tone", "tone"), ("legal:0.7+tone:0.3", {"legal": 0.7, "tone": 0.3})]:
        mix = eng.parse_model(spec)
        plan = eng.pool.plan([tuple((eng.pool.slot(n), w) for n, w in mix)])
        with torch.no_grad():
            ref = hf_with(tmp_path, active)(ids).logits
        close(eng.model.logits(ids, plan), ref)
        with torch.no_grad():
            assert not torch.allclose(ref, hf(ids).logits, atol=1e-3)  # the adapter really changes the output


@pytest.mark.smollm2
def test_compact_equals_transformers_on_smollm2(tmp_path):
    hf, tok = models.load_base("smollm2", num_layers=2)
    model = CompactLlama(hf, kernel="aten")  # transformers' own GEMMs; "onednn" rounds differently (test_serve_llama)
    ids = torch.tensor([tok.encode("The capital of France is")])
    with torch.no_grad():
        ref = hf(ids).logits
    close(model.logits(ids), ref)
    lp.inject(hf, lp.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False), "a", seed=3)
    lp.save_adapter(hf, "a", tmp_path / "a")
    pool = AdapterPool(model.layer_shapes())  # the compact model keeps the bare base weights it read
    store = ServedAdapters(tmp_path, pool, models.load_base("smollm2", num_layers=2)[0], reserved={"smollm2"})
    store.load("a")
    with torch.no_grad():
        ref = hf(ids).logits  # hf now runs base + adapter "a" on the fly
    close(model.logits(ids, pool.plan([pool.slot("a")])), ref)


# ---- continuous batching ------------------------------------------------------------------------------------
def test_continuous_batching_equals_each_request_alone(tmp_path):
    names = ["legal", "tone"]
    _, eng, _ = build(tmp_path, names, max_batch=3)
    g = torch.Generator().manual_seed(5)
    reqs = [(torch.randint(3, 128, (n,), generator=g).tolist(), m)
            for n, m in [(5, "legal"), (9, "tone"), (3, "tiny-llama"), (12, "legal:0.5+tone:0.5"), (7, "tone"),
                         (4, "legal")]]
    params = [GREEDY, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)] * 3
    handles = []
    arrivals = {0: [0], 2: [1, 2], 3: [3], 5: [4], 6: [5]}  # step -> requests submitted before it
    for step in range(200):
        for i in arrivals.get(step, []):
            handles.append((i, eng.submit(reqs[i][0], reqs[i][1], params[i])))
        eng.step()
        if len(handles) == len(reqs) and all(h.done for _, h in handles):
            break
    assert eng.lanes == [] and eng.waiting == 0
    for i, h in handles:
        alone = solo(tmp_path, names, reqs[i][0], reqs[i][1], params[i])
        assert h.result().token_ids == alone.token_ids, f"request {i} ({reqs[i][1]})"
        assert h.result().finish_reason == "length"
    # and running alone is transformers + loraplex on the fly, token for token
    assert solo(tmp_path, names, reqs[0][0], "legal").token_ids == hf_greedy(hf_with(tmp_path, "legal"), reqs[0][0], 10)
    assert solo(tmp_path, names, reqs[2][0], "base").token_ids == hf_greedy(models.tiny_llama(seed=0), reqs[2][0], 10)


def test_a_wave_beyond_max_prefill_tokens_is_prefilled_over_several_steps(tmp_path):
    """Rows are admitted while (rows x longest prompt) fits max_prefill_tokens; the rest wait for the next step
    (decoding in between), and a single longer prompt is still prefilled alone. Answers equal each alone."""
    _, eng, _ = build(tmp_path, max_batch=4, max_prefill_tokens=12, admit_min=1)
    prompts = [[5 + i] * 6 for i in range(4)] + [[7] * 20]  # four of 6 tokens, then one of 20 (> the budget)
    handles = [eng.submit(p, "base", GREEDY) for p in prompts]
    eng.step()
    assert [len(eng.running), eng.waiting] == [2, 3]  # 2 x 6 tokens fit 12; a third would make 18
    eng.step()
    assert [len(eng.running), eng.waiting] == [4, 1]
    while eng.waiting or eng.lanes:
        eng.step()
    for p, h in zip(prompts, handles):
        assert h.result().token_ids == solo(tmp_path, (), p, "base", GREEDY).token_ids


def test_round_robin_keeps_a_hot_adapter_from_starving_others(tmp_path):
    _, eng, _ = build(tmp_path, ["hot", "cold"], max_batch=1)
    order: list[str] = []
    p = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    for i in range(6):
        eng.submit([5 + i, 6], "hot", p, listener=lambda e, n=f"hot{i}": e[0] == "done" and order.append(n))
    eng.submit([9, 9], "cold", p, listener=lambda e: e[0] == "done" and order.append("cold"))
    while eng.waiting or eng.lanes:
        eng.step()
    assert order.index("cold") <= 1, order  # served right after the first hot request, not after all six


def test_stop_strings_eos_and_max_tokens(tmp_path):
    _, eng, _ = build(tmp_path)
    prompt = [40, 41, 42]
    free = eng.generate(prompt, "base", SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    assert free.finish_reason == "length" and free.completion_tokens == 12
    stop = free.text[3:5]
    cut = eng.generate(prompt, "base", SamplingParams(max_tokens=12, temperature=0.0, stop=(stop,), ignore_eos=True))
    assert cut.finish_reason == "stop" and cut.text == free.text[: free.text.index(stop)]
    eos = next(iter(eng.codec.eos_ids))
    d = Detokenizer(eng.codec, ("XYZ",))
    assert [d.push(t) for t in b"abX"] == ["a", "b", ""] and d.push(ord("Y")) == "" and d.push(ord("Q")) == "XYQ"
    assert d.push(eos) == "" and d.text == "abXYQ"


def test_sampling_is_seeded_and_top_p_tiny_is_greedy(tmp_path):
    _, eng, _ = build(tmp_path, ["legal"])
    prompt = [50, 51, 52, 53]
    hot = SamplingParams(max_tokens=10, temperature=1.5, seed=7, ignore_eos=True)
    a, b = eng.generate(prompt, "legal", hot), eng.generate(prompt, "legal", hot)
    assert a.token_ids == b.token_ids
    greedy = eng.generate(prompt, "legal", GREEDY)
    narrow = eng.generate(prompt, "legal", SamplingParams(max_tokens=10, temperature=1.0, top_p=1e-6, ignore_eos=True))
    assert narrow.token_ids == greedy.token_ids


def test_limits_and_bad_requests(tmp_path):
    _, eng, _ = build(tmp_path, ["legal"], max_queue=2)
    with pytest.raises(RequestTooLargeError, match="max-prompt-tokens"):
        eng.submit([5] * 49, "legal")
    with pytest.raises(ConfigError, match="max-new-tokens"):
        eng.submit([5], "legal", SamplingParams(max_tokens=33))
    with pytest.raises(AdapterNotFoundError):
        eng.submit([5], "nope")
    for bad in ["legal:x", "legal+base", "../etc", "legal:inf", ""]:
        with pytest.raises(ConfigError):
            eng.submit([5], bad)
    with pytest.raises(ConfigError, match="token ids"):
        eng.submit([500], "legal")
    eng.submit([5], "legal")
    eng.submit([6], "legal")
    with pytest.raises(QueueFullError):
        eng.submit([7], "legal")


def test_request_timeout_and_cancel(tmp_path):
    _, eng, _ = build(tmp_path, timeout_s=0.05)
    h = eng.submit([5, 6], "base", SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))
    eng.step()
    threading.Event().wait(0.1)
    eng.step()
    res = h.result(1)
    assert res.finish_reason == "error" and isinstance(res.error, RequestTimeoutError)
    _, eng, _ = build(tmp_path / "c")
    h = eng.submit([5, 6], "base", SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))
    eng.step()
    h.cancel()
    eng.step()
    assert h.result(1).finish_reason == "cancelled" and eng.lanes == []


def test_replace_and_remove_while_running_keep_the_started_version(tmp_path):
    _, eng, store = build(tmp_path, ["legal"])
    prompt = [60, 61, 62, 63]
    before = eng.generate(prompt, "legal", GREEDY).token_ids
    h = eng.submit(prompt, "legal", GREEDY)
    eng.step()  # admitted: it holds a lease on the first version
    make_adapter(tmp_path / "legal", seed=42)  # new content on disk, then swapped in place
    with pytest.raises(AdapterExistsError):
        store.load("legal")
    store.load("legal", replace=True)
    h2 = eng.submit(prompt, "legal", GREEDY)
    store.remove("legal")  # h2 is queued: it fails at admission with 404; h finishes on its lease
    while eng.lanes or eng.waiting:
        eng.step()
    assert h.result().token_ids == before
    assert isinstance(h2.result().error, AdapterNotFoundError)
    store.load("legal")
    after = eng.generate(prompt, "legal", GREEDY).token_ids
    assert after != before and after == hf_greedy(hf_with(tmp_path, "legal"), prompt, 10)


def test_memory_budget_evicts_and_reloads_from_disk(tmp_path):
    af = make_adapter(tmp_path / "probe", seed=1)
    one = sum(t.numel() for t in af.tensors.values()) * 4
    _, eng, store = build(tmp_path, ["a", "b", "c"], budget=one * 2)
    prompt = [70, 71, 72]
    want = {n: solo(tmp_path, ["a", "b", "c"], prompt, n).token_ids for n in "abc"}
    for n in "abcabc":
        assert eng.generate(prompt, n, GREEDY).token_ids == want[n]
    assert eng.pool.stats.evictions >= 3
    assert sum(eng.metrics.labels("loraplex_adapter_evictions_total", "adapter").values()) >= 3
    assert eng.metrics.labels("loraplex_adapter_loads_total", "adapter") == {"a": 1, "b": 1, "c": 1}


def test_adapter_validation(tmp_path):
    hf, eng, store = build(tmp_path)
    make_adapter(tmp_path / "qonly", seed=1, targets=["q_proj"])
    assert store.load("qonly").layers == 2
    for bad in ["../x", "a/b", "..", ""]:
        with pytest.raises(ConfigError):
            store.load(bad)
    with pytest.raises(AdapterExistsError):
        store.load("base")
    with pytest.raises(AdapterNotFoundError):
        store.load("missing")
    other = models.tiny_llama(seed=0, num_hidden_layers=3)
    lp.inject(other, lp.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), "a")
    lp.save_adapter(other, "a", tmp_path / "deep")
    with pytest.raises(BaseMismatchError):
        store.load("deep")
    store.check_base_model = False
    with pytest.raises(TargetNotFoundError, match="model.layers.2"):
        store.load("deep")
    with pytest.raises(AdapterFileError):
        store.upload("z", b"not a zip")
    assert store.names() == ["qonly"]


def test_shutdown_drains_running_and_queued_requests(tmp_path):
    _, eng, _ = build(tmp_path, ["legal"], max_batch=2)
    eng.start()
    p = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    hs = [eng.submit([5 + i, 6], "legal" if i % 2 else "base", p) for i in range(5)]
    eng.shutdown(drain=True, timeout=60)
    assert [h.result(0).finish_reason for h in hs] == ["length"] * 5
    with pytest.raises(ShuttingDownError):
        eng.submit([5], "legal")


def test_pool_full_fails_only_when_nothing_can_free_room(tmp_path):
    af = make_adapter(tmp_path / "probe", seed=1)
    one = sum(t.numel() for t in af.tensors.values()) * 4
    _, eng, _ = build(tmp_path, ["a", "b"], budget=one, max_batch=2)
    p = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    ha, hb = eng.submit([5, 6], "a", p), eng.submit([5, 6], "b", p)
    while eng.lanes or eng.waiting:
        eng.step()
    assert ha.result().finish_reason == hb.result().finish_reason == "length"  # b waited for a's lease
    assert issubclass(PoolFullError, LoraplexError)


def test_single_adapter_baseline_never_mixes_a_batch(tmp_path):
    _, eng, _ = build(tmp_path, ["a", "b"], max_batch=4, single_adapter=True)
    mixed: list[set] = []
    eng.on_step = lambda: mixed.append({s.key for s in eng.running})
    p = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    hs = [eng.submit([5 + i, 6], "ab"[i % 2], p) for i in range(6)]
    while eng.lanes or eng.waiting:
        eng.step()
    assert all(len(k) <= 1 for k in mixed) and {"a"} in mixed and {"b"} in mixed
    assert all(h.result().finish_reason == "length" for h in hs)
