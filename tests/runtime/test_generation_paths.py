"""The three generation paths — `MultiLoraModel.generate` (HF model, KV cache), the server's Engine (compact
decoder, lanes) and evaluate's exact-match generation — share one stop rule (`runtime.generate.stop_ids`), one
left pad and one sampler: for a model whose generation_config, config and tokenizer name different
end-of-sequence ids, all three stop at the same token, and the same seed samples the same tokens."""

from __future__ import annotations

import pytest
import torch
from serve_helpers import make_adapter
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers import models as tokenizer_models
from transformers import PreTrainedTokenizerFast

import loraplex as lp
from loraplex import models
from loraplex.errors import ConfigError, MergeStateError, UnsupportedFeatureError
from loraplex.functional import tolerance
from loraplex.runtime import AdapterPool, MultiLoraModel
from loraplex.runtime.generate import left_pad, stop_ids
from loraplex.runtime.steps import DecoderSteps, HFSteps
from loraplex.serve import CompactLlama, Engine, EngineConfig, SamplingParams
from loraplex.serve.adapters import ServedAdapters
from loraplex.serve.text import TextCodec
from loraplex.train.data import IGNORE_INDEX, Example
from loraplex.workflows.evaluate import evaluate
from lora_helpers import move_off_init

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread

PROMPT = [1, 5, 9, 17, 33, 65]
N = 16


def word_tokenizer(eos: int) -> PreTrainedTokenizerFast:
    """A real transformers tokenizer over tiny_llama's 128 ids: token i is the word "t<i>"."""
    tk = Tokenizer(tokenizer_models.WordLevel({f"t{i}": i for i in range(128)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=f"t{eos}", pad_token="t0")


def base(generation_eos: int, config_eos: int) -> torch.nn.Module:
    model = models.tiny_llama(seed=0)
    model.config.eos_token_id = config_eos
    model.generation_config.eos_token_id = generation_eos
    return model


def via_generate(model, tok, adapter_dir, **sampling) -> list[int]:
    engine = MultiLoraModel(model, tokenizer=tok)
    engine.load("a", adapter_dir)
    return engine.generate([PROMPT], ["a"], max_new_tokens=N, **sampling)[0].token_ids


def via_server(model, tok, adapter_dir, params: SamplingParams) -> list[int]:
    compact = CompactLlama(model)
    pool = AdapterPool(compact.layer_shapes(), dtype=compact.dtype)
    store = ServedAdapters(adapter_dir.parent, pool, model, reserved={"base"})
    store.load(adapter_dir.name)
    engine = Engine(compact, pool, TextCodec.for_model(tok, model), base_ids=("base",),
                    config=EngineConfig(max_prompt_tokens=32, max_new_tokens=N))
    result = engine.generate(PROMPT, adapter_dir.name, params)
    # the server's token_ids keep the end-of-sequence token that stopped the row; generate's leave it out
    stopped = result.finish_reason == "stop"
    return result.token_ids[:-1] if stopped else result.token_ids


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("adapters") / "a"
    make_adapter(directory, seed=1)
    return directory


@pytest.fixture(scope="module")
def free_run(adapter_dir) -> list[int]:
    """Greedy tokens after PROMPT with adapter "a" and no end-of-sequence id at all."""
    engine = MultiLoraModel(models.tiny_llama(seed=0))
    engine.load("a", adapter_dir)
    return engine.generate([PROMPT], ["a"], max_new_tokens=N, eos_token_id=[])[0].token_ids


@pytest.mark.parametrize("earliest", ["generation_config", "config", "tokenizer"])
def test_all_paths_stop_on_the_same_ids(adapter_dir, free_run, earliest):
    firsts = list(dict.fromkeys(free_run))  # distinct tokens in order of first appearance
    assert len(firsts) >= 4, f"the free run repeats too much to pick stop ids: {free_run}"
    u1, u2, u3 = firsts[1:4]  # u1 appears first: whichever source names it decides where generation stops
    order = {"generation_config": (u1, u2, u3), "config": (u2, u1, u3), "tokenizer": (u2, u3, u1)}[earliest]
    gen_eos, config_eos, tok_eos = order
    tok = word_tokenizer(tok_eos)
    stop_at = free_run.index(u1)
    want = free_run[:stop_at]
    assert stop_ids(base(gen_eos, config_eos), tok) == {u1, u2, u3}
    assert TextCodec.for_model(tok, base(gen_eos, config_eos)).eos_ids == {u1, u2, u3}

    assert via_generate(base(gen_eos, config_eos), tok, adapter_dir) == want
    assert via_server(base(gen_eos, config_eos), tok, adapter_dir, SamplingParams(max_tokens=N, temperature=0)) == want
    # evaluate: the reference is the free run cut right after u1 plus a token the model would not produce there;
    # exact match is 1 only if evaluate's greedy reply stops at u1 and its stop set cuts the reference there too
    junk = (free_run[stop_at + 1] + 1) % 128 if stop_at + 1 < len(free_run) else 0
    target = free_run[: stop_at + 1] + [junk]
    example = Example(PROMPT + target, [IGNORE_INDEX] * len(PROMPT) + target)
    result = evaluate(base(gen_eos, config_eos), tok, {"a": adapter_dir}, [example], metrics=["exact_match"],
                      include_base=False, max_new_tokens=N, progress=False)
    assert result.scores["a"]["exact_match"] == 1.0


@pytest.mark.parametrize("seed", [3, 11])
def test_same_seed_samples_the_same_tokens_in_generate_and_the_server(adapter_dir, seed):
    tok = word_tokenizer(2)
    got = via_generate(base(2, 2), tok, adapter_dir, temperature=0.9, top_p=0.95, seed=seed)
    params = SamplingParams(max_tokens=N, temperature=0.9, top_p=0.95, seed=seed)
    assert via_server(base(2, 2), tok, adapter_dir, params) == got
    assert got != via_generate(base(2, 2), tok, adapter_dir, temperature=0.9, top_p=0.95, seed=seed + 1)


# ---- generate's two backends: the compact decoder (default on a Llama-family base) and the HF model ----------

ROWS = [None, "a", {"a": 0.6, "b": -0.4}, "d", "b", None]  # base, one adapter, a weighted mix, DoRA, ...
RAGGED = [[5, 9, 11, 40, 7], [3], [100, 20, 30], [8, 8, 8, 8, 8, 8, 8, 8], [1, 2], [64, 65, 66, 67]]
SPECS = {"a": dict(r=4, lora_alpha=8, target_modules="all-linear"),
         "b": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True),
         "d": dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "up_proj"], use_dora=True)}


def random_adapter(build, directory, seed: int, **fields):
    """An adapter for the base build() makes, every trained tensor (A, B, DoRA's magnitude) moved off its
    init, saved in PEFT's layout."""
    model = build()
    lp.inject(model, lp.LoraConfig(init_lora_weights=False, **fields), "x", seed=seed)
    move_off_init(model, seed)
    lp.save_adapter(model, "x", directory)
    return directory


def two_layer_smollm2():
    """SmolLM2-135M's real architecture and weights (GQA 9/3 heads, tied embeddings), cut to 2 layers."""
    return models.load_base("smollm2", num_layers=2)[0]


BASES = {"tiny_llama": lambda: models.tiny_llama(seed=0),
         "smollm2_2_layers": pytest.param(two_layer_smollm2, marks=pytest.mark.smollm2)}


@pytest.fixture(scope="module", params=list(BASES), ids=list(BASES))
def engine(request, tmp_path_factory) -> MultiLoraModel:
    build = {"tiny_llama": BASES["tiny_llama"], "smollm2_2_layers": two_layer_smollm2}[request.param]
    root = tmp_path_factory.mktemp(request.param)
    eng = MultiLoraModel(build())
    for i, (name, fields) in enumerate(SPECS.items()):
        eng.load(name, random_adapter(build, root / name, i + 1, **fields))
    return eng


@pytest.fixture
def ran(engine, monkeypatch) -> dict[str, int]:
    """How many forwards ran on each path: the compact decoder's calls (counted, then run) and HF model calls."""
    counts = {"decoder": 0, "hf": 0}
    decoder = engine.compact_decoder()
    for entry in ("prefill", "decode"):
        real = getattr(decoder, entry)

        def counted(*args, _real=real, **kwargs):
            counts["decoder"] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(decoder, entry, counted)
    hook = engine.model.register_forward_hook(lambda *_: counts.__setitem__("hf", counts["hf"] + 1))
    yield counts
    hook.remove()


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    """tolerance(float32), its atol times the logits' scale when that is above 1: the two paths round differently
    (fused GEMMs, oneDNN vs MKL), and an absolute rounding error grows with the magnitude of what is summed
    (SmolLM2's logits reach ~30: 2e-5 apart where the table's atol is 1e-5)."""
    atol, rtol = tolerance(torch.float32)
    torch.testing.assert_close(a, b, atol=atol * max(1.0, float(b.abs().max())), rtol=rtol)


def test_decoder_and_hf_steps_give_the_same_logits_per_step(engine):
    """Prefill and 5 decode steps of a ragged, mixed batch (base, adapter, mix, DoRA rows): the same logits."""
    decoder = engine.compact_decoder()  # before the batch: its layers must be in the plan
    with engine.batch(ROWS) as batch:
        dec = DecoderSteps(batch, decoder, RAGGED, 0, 6)
        hf = HFSteps(batch, *left_pad(RAGGED, 0, engine.pool.device), engine.model)
        d, h = dec.first(), hf.first()  # (B, V)
        for _ in range(5):
            close(d, h)
            tokens = h.argmax(-1)
            d, h = dec.next(tokens), hf.next(tokens)
        close(d, h)
    assert not torch.allclose(h[1], h[0])  # the adapters act


def generations(engine, backend: str, **kw) -> list[tuple]:
    return [(g.token_ids, g.finish_reason, g.prompt_tokens) for g in
            engine.generate(RAGGED, ROWS, backend=backend, **kw)]


def test_generate_backends_give_the_same_tokens(engine, ran):
    greedy = generations(engine, "hf", max_new_tokens=7, eos_token_id=[])
    assert ran == {"decoder": 0, "hf": 7}
    assert generations(engine, "decoder", max_new_tokens=7, eos_token_id=[]) == greedy
    assert ran == {"decoder": 7, "hf": 7}
    assert generations(engine, "auto", max_new_tokens=7, eos_token_id=[]) == greedy
    assert ran == {"decoder": 14, "hf": 7}  # auto ran on the decoder
    assert generations(engine, "decoder", max_new_tokens=3, eos_token_id=[]) == [
        (t[:3], r, n) for t, r, n in greedy]
    eos = greedy[1][0][2]  # row 1's third token ends its sequence (and any other row's where it shows up)
    stopped = generations(engine, "decoder", max_new_tokens=7, eos_token_id=eos)
    assert stopped == generations(engine, "hf", max_new_tokens=7, eos_token_id=eos)
    assert stopped == [(t[: t.index(eos)], "stop", n) if eos in t else (t, "length", n) for t, _, n in greedy]
    assert stopped[1][1] == "stop"
    sampled = dict(max_new_tokens=7, eos_token_id=[], temperature=1.3, top_p=0.9, seed=[1, 2, 3, 4, 5, 6])
    assert generations(engine, "decoder", **sampled) == generations(engine, "hf", **sampled) != greedy


@pytest.mark.parametrize("backend", ["decoder", "hf"])
@pytest.mark.parametrize("seed", [3, 11])
def test_same_seed_samples_the_same_tokens_on_both_backends_and_the_server(adapter_dir, seed, backend):
    tok = word_tokenizer(2)
    got = via_generate(base(2, 2), tok, adapter_dir, temperature=0.9, top_p=0.95, seed=seed, backend=backend)
    params = SamplingParams(max_tokens=N, temperature=0.9, top_p=0.95, seed=seed)
    assert via_server(base(2, 2), tok, adapter_dir, params) == got


def test_what_the_decoder_cannot_run_falls_back_to_hf_or_is_refused(tmp_path):
    """GPT-2, a quantized base, a merged adapter, a modules_to_save copy of the embedding, a context past the
    positions: auto runs the HF model (same tokens as backend='hf'), backend='decoder' raises saying why. LoRA on
    lm_head runs on the decoder (its head applies it)."""
    from loraplex.quant import quantize_model

    def check(eng: MultiLoraModel, why: str, prompts=([5, 6, 7], [9]), rows=(None, None), n: int = 4) -> None:
        with pytest.raises(UnsupportedFeatureError, match=why):
            eng.generate(list(prompts), list(rows), max_new_tokens=n, backend="decoder")
        auto = eng.generate(list(prompts), list(rows), max_new_tokens=n, eos_token_id=[])
        hf = eng.generate(list(prompts), list(rows), max_new_tokens=n, eos_token_id=[], backend="hf")
        assert [g.token_ids for g in auto] == [g.token_ids for g in hf] and len(auto[0].token_ids) == n

    check(MultiLoraModel(models.tiny_gpt2()), "Llama-family")
    quantized = models.tiny_llama(seed=0)
    quantize_model(quantized, "int8")
    check(MultiLoraModel(quantized), "QuantLinear")

    eng = MultiLoraModel(models.tiny_llama(seed=0))
    eng.load("a", random_adapter(models.tiny_llama, tmp_path / "a", 1, **SPECS["a"]))
    eng.load("h", random_adapter(models.tiny_llama, tmp_path / "h", 2, r=2, target_modules=["q_proj", "lm_head"]))
    eng.load("e", random_adapter(models.tiny_llama, tmp_path / "e", 3, r=2, target_modules=["q_proj"],
                                 modules_to_save=["embed_tokens"]))
    first = eng.compact_decoder()
    check(eng, "model.embed_tokens", rows=("e", "a"))  # a copy of the embedding: no per-row place in the decoder
    dec = eng.generate([[5, 6, 7], [9]], ["h", "a"], max_new_tokens=4, eos_token_id=[], backend="decoder")
    hf = eng.generate([[5, 6, 7], [9]], ["h", "a"], max_new_tokens=4, eos_token_id=[], backend="hf")
    assert [g.token_ids for g in dec] == [g.token_ids for g in hf]  # LoRA on lm_head: the decoder's head serves it
    check(eng, "positions", prompts=([5] * 250, [9]), n=8)  # tiny_llama holds 256 positions
    eng.merge("a")
    check(eng, "merged", rows=("a", None))
    with pytest.raises(UnsupportedFeatureError, match="merged"):
        eng.compact_decoder()
    eng.unmerge()
    assert eng.compact_decoder() is not first  # rebuilt over the restored weights
    with pytest.raises(ConfigError, match="backend"):
        eng.generate([[5]], [None], backend="vllm")


def test_a_merge_during_a_decoder_generation_is_refused(tmp_path):
    eng = MultiLoraModel(models.tiny_llama(seed=0))
    eng.load("a", random_adapter(models.tiny_llama, tmp_path / "a", 1, **SPECS["a"]))
    decoder = eng.compact_decoder()
    with eng.batch(["a"]) as batch:
        steps = DecoderSteps(batch, decoder, [[5, 6]], 0, 4)
        steps.first()
        eng.merge("a")
        with pytest.raises(MergeStateError, match="changed the base weights"):
            steps.next(torch.tensor([3]))
        eng.unmerge()
