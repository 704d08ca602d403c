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

from loraplex import models
from loraplex.runtime import AdapterPool, MultiLoraModel
from loraplex.runtime.generate import stop_ids
from loraplex.serve import CompactLlama, Engine, EngineConfig, SamplingParams
from loraplex.serve.adapters import ServedAdapters
from loraplex.serve.text import TextCodec
from loraplex.train.data import IGNORE_INDEX, Example
from loraplex.workflows.evaluate import evaluate

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
