"""Embedding rows (embedding LoRA, trainable tokens) beside modules_to_save copies and LoRA on the output head: each
combination PEFT writes is served as PEFT computes it (MultiLoraModel and the server's Engine, tied and untied
heads), or refused with a typed error that says why, leaving the engine unchanged."""

from __future__ import annotations

import peft
import pytest
import torch

import loraplex as lp
from loraplex.functional import tolerance
from loraplex.models import tiny_llama
from peft_helpers import peft_adapter_dir

ATOL, RTOL = tolerance(torch.float32)
COMBOS = {  # name -> PEFT LoraConfig fields
    # untied: the row runs its lm_head copy and embeds with its tokens (tied: refused, below)
    "head_tok": dict(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"], trainable_token_indices=[5, 9]),
    "head_emb": dict(r=2, target_modules=["q_proj", "embed_tokens"], modules_to_save=["lm_head"]),
    "tok": dict(r=2, target_modules=["v_proj"], trainable_token_indices=[3, 40]),  # tied: LoRA rows on the head
    "plain": dict(r=2, target_modules=["k_proj", "lm_head"]),
}

def _base(tied: bool):
    return tiny_llama(seed=0, tie_word_embeddings=tied)


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def written(request, tmp_path_factory):
    """(tied, {name: directory}, {name: the PEFT model of that adapter alone; None: the bare base})."""
    tied, root = request.param, tmp_path_factory.mktemp("combos")
    dirs = {n: peft_adapter_dir(root / n, tied, i + 1, **f) for i, (n, f) in enumerate(COMBOS.items())
            if not (tied and n == "head_tok")}  # refused on a tied base: test_what_has_no_per_row_form_is_refused
    oracles = {None: _base(tied).eval(), **{n: peft.PeftModel.from_pretrained(_base(tied), d).eval()
                                            for n, d in dirs.items()}}
    return tied, dirs, oracles


def test_runtime_rows_equal_peft(written):
    """MultiLoraModel: rows with an lm_head copy beside embedding LoRA / trainable tokens rows. A module is either
    copied or adapted on one engine (a LoRA wrapper inside a copy cannot serve the copy's subset of rows): LoRA on
    lm_head, and on a tied base trainable tokens (LoRA rows on the head), are refused beside an lm_head copy."""
    from loraplex.runtime import MultiLoraModel

    tied, dirs, oracles = written
    eng = MultiLoraModel(_base(tied))
    head_lora = {"plain", "tok"} if tied else {"plain"}
    for n, d in dirs.items():
        if n in head_lora:
            with pytest.raises(lp.UnsupportedFeatureError, match="either copied or adapted"):
                eng.load(n, d)
        else:
            eng.load(n, d)
    assert sorted(eng.names()) == sorted(set(dirs) - head_lora)
    rows = ["head_emb", None, "head_emb"] + [n for n in ("tok", "head_tok") if n in eng]
    ids = torch.tensor([[5, 9, 3, 40, 17, 5, 9]] * len(rows))
    with torch.no_grad():
        want = torch.cat([oracles[n](input_ids=ids[b:b + 1]).logits for b, n in enumerate(rows)])
    torch.testing.assert_close(eng.forward(ids, adapters=rows), want, atol=ATOL, rtol=RTOL)
    out = eng.generate([[5, 9, 3]] * len(rows), adapters=rows, max_new_tokens=4, eos_token_id=[])
    for b, n in enumerate(rows):
        with torch.no_grad():
            seq = torch.tensor([[5, 9, 3]])
            for _ in range(4):
                seq = torch.cat([seq, oracles[n](input_ids=seq).logits[:, -1:].argmax(-1)], 1)
        assert out[b].token_ids == seq[0, 3:].tolist(), n


def test_server_engine_tokens_and_prompt_logprobs_equal_peft(written, tmp_path):
    """The compact decoder's head: a row's lm_head copy, then the head's LoRA rows (tied tokens, lm_head LoRA);
    prompt logprobs go through the same head with the request's one-row plan."""
    from loraplex.runtime import AdapterPool
    from loraplex.serve import CompactLlama, Engine, EngineConfig, SamplingParams
    from loraplex.serve.adapters import ServedAdapters
    from loraplex.serve.text import TextCodec

    tied, dirs, oracles = written
    hf = _base(tied)
    model = CompactLlama(hf)
    pool = AdapterPool(model.layer_shapes(), dtype=model.dtype)
    for key, (vocab, dim) in model.embedding_shapes().items():
        pool.register_layer(key, vocab, dim, embedding=True)
    store = ServedAdapters(dirs["plain"].parent, pool, hf, reserved={"base"})
    for n in dirs:
        store.load(n)
    eng = Engine(model, pool, TextCodec.for_model(None, hf.config), base_ids=("base",),
                 config=EngineConfig(max_batch=4, max_prompt_tokens=32, max_new_tokens=16))
    prompt = [5, 9, 3, 40, 17]
    for n in dirs:
        res = eng.generate(prompt, n, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True,
                                                     prompt_logprobs=0))
        with torch.no_grad():
            ids = torch.tensor([prompt])
            want = torch.log_softmax(oracles[n](input_ids=ids).logits[0, :-1], -1)[torch.arange(4), ids[0, 1:]]
            seq = ids
            for _ in range(3):
                seq = torch.cat([seq, oracles[n](input_ids=seq).logits[:, -1:].argmax(-1)], 1)
        assert res.token_ids == seq[0, len(prompt):].tolist(), n
        got = torch.tensor([e.logprob for e in res.prompt_logprobs[1:]])
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


def test_what_has_no_per_row_form_is_refused(tmp_path):
    """A modules_to_save copy under trainable tokens (PEFT: modules_to_save=["lm_head"] on a tied base, or
    ["embed_tokens"], with trainable tokens: it trains the copy and overlays the token rows), LoRA on a head that
    trainable tokens are tied to (PEFT adds both there: one set of factors per module and slot here), an
    embedding that one adapter copies and another adapts (either order): refused, typed, by the runtime and the
    server's reader; nothing kept."""
    from loraplex.runtime import MultiLoraModel
    from loraplex.runtime.decoder import saved_places
    from loraplex.runtime.slots import pool_tensors

    cases = [(dict(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"], trainable_token_indices=[5, 9]),
              True, "modules_to_save copy of 'lm_head' under its trainable tokens"),
             (dict(r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens"], trainable_token_indices=[3]),
              False, "modules_to_save copy of 'model.embed_tokens' under its trainable tokens"),
             (dict(r=2, target_modules=["q_proj", "lm_head"], trainable_token_indices=[5, 9]), True,
              "trainable tokens tied to it")]
    for i, (fields, tied, match) in enumerate(cases):
        path = peft_adapter_dir(tmp_path / f"case{i}", tied, i + 1, **fields)
        eng = MultiLoraModel(_base(tied))
        with pytest.raises(lp.UnsupportedFeatureError, match=match):
            eng.load("t", path)
        assert eng.stats.adapters == 0 and not eng.wrapped
        hf, af = _base(tied), lp.read_adapter(path)
        with pytest.raises(lp.UnsupportedFeatureError, match=match):  # the server's reader
            pool_tensors(af, {}, hf.get_submodule, saved_places(hf), base=hf)
        if "under its trainable tokens" in match:  # every reader: the check the server runs first too
            with pytest.raises(lp.UnsupportedFeatureError, match=match):
                lp.validate_adapter(af, hf)

    copy = peft_adapter_dir(tmp_path / "c", False, 2, r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens"])
    emb = peft_adapter_dir(tmp_path / "e", False, 3, r=2, target_modules=["q_proj", "embed_tokens"])
    for first, second in ((copy, emb), (emb, copy)):
        eng = MultiLoraModel(_base(False))
        eng.load("first", first)
        with pytest.raises(lp.UnsupportedFeatureError, match="either copied or adapted"):
            eng.load("second", second)
        assert eng.names() == ["first"]
