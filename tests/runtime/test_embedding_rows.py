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

ATOL, RTOL = tolerance(torch.float32)
ADAPTERS = {  # name -> PEFT LoraConfig fields
    "plain": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]),
    "emb": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "o_proj"], rank_pattern={"embed_tokens": 3}),
    "tok": dict(r=2, lora_alpha=4, target_modules=["k_proj"], trainable_token_indices=[3, 5, 40, 77]),
    "tok2": dict(r=2, lora_alpha=4, target_modules=["down_proj"], trainable_token_indices={"embed_tokens": [5, 9]}),
}


def _randomize(model, seed):
    """Move every trainable tensor (A, B, the trainable tokens' rows) away from its init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


def _base(tied: bool):
    return tiny_llama(seed=0, tie_word_embeddings=tied)


def _write(root, tied):
    """Each adapter written by PEFT on the tiny Llama (tied or untied head); {name: directory}."""
    dirs = {}
    for i, (name, fields) in enumerate(ADAPTERS.items()):
        pm = peft.get_peft_model(_base(tied), peft.LoraConfig(init_lora_weights=False, **fields))
        _randomize(pm, i + 1)
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
