"""Issue 18: real OpenAI clients work unchanged. Through the official `openai` client over a loopback server:
logprobs and echo against log_softmax of PEFT's logits for the same rows (base and adapters), prompt lists,
n and best_of, streaming, chat logprobs, every field refused by name, the error classes, /v1/models/{id},
--served-model-name, /tokenize and /detokenize. Without HTTP: the sampler's adjustments against a slow
reference (hypothesis), penalties per row in one batch, and the incremental detokenizer.
"""

from __future__ import annotations

import openai
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import PeftModel
from reference_sampling import reference_distribution
from serve_helpers import LoopbackServer
from test_serve_engine import build
from test_serve_hostile import NUMBERS
# client and http are fixtures; here they run over this module's `served`
from test_serve_http import ADMIN, IGNORE_EOS, client, http, serving  # noqa: F401

from loraplex import cli, models
from loraplex.errors import ConfigError
from loraplex.functional import tolerance
from loraplex.runtime import sampling
from loraplex.runtime.sampling import SamplingParams, distribution, sample_next
from loraplex.serve.app import create_app
from loraplex.serve.engine import EngineConfig
from loraplex.cli.serve import build_server, check_args
from loraplex.serve.text import Detokenizer, TextCodec

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread
TOL = dict(atol=1e-4, rtol=1e-4)  # float32 logprobs: the compact decoder vs transformers + PEFT


@pytest.fixture(scope="module")
def served(tmp_path_factory, one_thread):
    folder = tmp_path_factory.mktemp("adapters")
    with serving(folder, ["legal", "tone"]) as (server, loop):
        yield server, loop, folder


def reference(folder, model: str):
    """The oracle: transformers' tiny_llama(0), with PEFT loading the adapter unless `model` is the base."""
    base = models.tiny_llama(seed=0)
    return base if model == "tiny-llama" else PeftModel.from_pretrained(base, str(folder / model)).eval()


def ref_logprobs(ref, ids: list[int]) -> torch.Tensor:
    """(len(ids), V): log_softmax of the reference's logits; row j scores the token after ids[j]."""
    with torch.no_grad():
        return torch.log_softmax(ref(torch.tensor([ids])).logits[0].float(), dim=-1)


# ---- (1) logprobs, echo, prompt lists, n, best_of ----------------------------------------------------------------
@pytest.mark.parametrize("model", ["tiny-llama", "legal"])
def test_echo_logprobs_of_a_prompt_list_equal_peft(served, client, model):
    """lm-eval's loglikelihood request: several token-id prompts, echo, logprobs, max_tokens 1, greedy."""
    server, _, folder = served
    ref = reference(folder, model)
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16, 17, 18]]
    r = client.completions.create(model=model, prompt=prompts, max_tokens=1, echo=True, logprobs=3,
                                  temperature=0, extra_body=IGNORE_EOS)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.prompt_tokens == 14 and r.usage.completion_tokens == 3
    for c, p in zip(r.choices, prompts):
        gen = int(ref_logprobs(ref, p)[-1].argmax())
        lp = ref_logprobs(ref, p + [gen])  # (len(p) + 1, V)
        got = c.logprobs.token_logprobs
        assert got[0] is None and c.logprobs.top_logprobs[0] is None and len(got) == len(p) + 1
        want = [lp[j, t] for j, t in enumerate(p[1:] + [gen])]
        torch.testing.assert_close(torch.tensor(got[1:]), torch.stack(want), **TOL)
        assert c.logprobs.tokens == [server.codec.token_text(t) for t in p + [gen]]
        assert c.text == server.codec.decode(p) + server.codec.decode([gen])
        for j in range(1, len(p) + 1):  # the chosen token and the 3 most likely, keyed by their text
            top = lp[j - 1].topk(3)
            want_top = {server.codec.token_text(int(t)): float(v) for v, t in zip(top.values, top.indices)}
            want_top.setdefault(c.logprobs.tokens[j], float(want[j - 1]))
            got_top = c.logprobs.top_logprobs[j]
            assert got_top.keys() == want_top.keys()
            torch.testing.assert_close(torch.tensor([got_top[k] for k in want_top]),
                                       torch.tensor(list(want_top.values())), **TOL)


def test_echo_with_max_tokens_0_reads_only_the_prompt(served, client):
    server, _, folder = served
    p = [20, 21, 22, 23]
    before = server.metrics.value("loraplex_prompt_tokens_total", adapter="tone")
    r = client.completions.create(model="tone", prompt=p, max_tokens=0, echo=True, logprobs=0)
    assert server.metrics.value("loraplex_prompt_tokens_total", adapter="tone") == before + 4  # prefilled
    c = r.choices[0]
    assert c.text == server.codec.decode(p) and c.finish_reason == "length" and r.usage.completion_tokens == 0
    lp = ref_logprobs(reference(folder, "tone"), p)
    torch.testing.assert_close(torch.tensor(c.logprobs.token_logprobs[1:]),
                               torch.stack([lp[j, t] for j, t in enumerate(p[1:])]), **TOL)


def test_generated_logprobs_equal_peft_and_do_not_depend_on_sampling_values(served, client):
    """Raw logprobs (vLLM's default mode): log_softmax of the model's logits, whatever temperature or
    penalties did to the draw."""
    _, _, folder = served
    ref = reference(folder, "legal")
    p = [30, 31, 32]
    r = client.completions.create(model="legal", prompt=p, max_tokens=5, temperature=1.3, seed=3, logprobs=2,
                                  frequency_penalty=1.0, extra_body={**IGNORE_EOS, "top_k": 5})
    gen = [ord(t) for t in r.choices[0].logprobs.tokens]  # the byte vocabulary: ids < 128 are ASCII
    lp = ref_logprobs(ref, p + gen)
    want = torch.stack([lp[len(p) - 1 + j, t] for j, t in enumerate(gen)])
    torch.testing.assert_close(torch.tensor(r.choices[0].logprobs.token_logprobs), want, **TOL)


def test_n_copies_are_seeded_copy_by_copy_and_best_of_keeps_the_likeliest(client):
    kw = dict(model="legal", prompt="ab", max_tokens=6, temperature=1.0, extra_body=IGNORE_EOS)
    three = client.completions.create(n=3, seed=5, logprobs=0, **kw)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert three.usage.completion_tokens == 18
    for j in range(3):  # copy j samples with seed + j
        assert client.completions.create(seed=5 + j, **kw).choices[0].text == three.choices[j].text
    score = {c.text: sum(c.logprobs.token_logprobs) for c in three.choices}
    best = client.completions.create(n=2, best_of=3, seed=5, **kw)
    assert [c.text for c in best.choices] == sorted(score, key=score.get, reverse=True)[:2]
    assert all(c.logprobs is None for c in best.choices)  # not asked for: not shown


def test_prompt_lists_times_n_are_indexed_prompt_major(served, client):
    server, _, _ = served
    prompts = ["ab", "cd"]
    r = client.completions.create(model="tone", prompt=prompts, n=2, max_tokens=4, temperature=0,
                                  extra_body=IGNORE_EOS)
    alone = [client.completions.create(model="tone", prompt=p, max_tokens=4, temperature=0,
                                       extra_body=IGNORE_EOS).choices[0].text for p in prompts]
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [alone[0], alone[0], alone[1], alone[1]]


def test_streaming_n_and_logprobs_match_the_plain_answer(client):
    kw = dict(model="legal", prompt=[[40, 41], [42, 43, 44]], n=2, max_tokens=5, temperature=0, logprobs=2,
              extra_body=IGNORE_EOS)
    plain = client.completions.create(**kw)
    texts, lps, finish = {}, {}, {}
    for part in client.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        for c in part.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.logprobs is not None:
                lps.setdefault(c.index, []).extend(c.logprobs.token_logprobs)
            if c.finish_reason:
                finish[c.index] = c.finish_reason
        if part.usage is not None:
            assert part.usage.completion_tokens == plain.usage.completion_tokens
    for c in plain.choices:
        assert texts[c.index] == c.text and finish[c.index] == c.finish_reason
        torch.testing.assert_close(torch.tensor(lps[c.index]), torch.tensor(c.logprobs.token_logprobs))


def test_streaming_echo_sends_the_prompt_first(served, client):
    server, _, _ = served
    parts = list(client.completions.create(model="legal", prompt=[50, 51, 52], max_tokens=3, echo=True,
                                           temperature=0, stream=True, extra_body=IGNORE_EOS))
    plain = client.completions.create(model="legal", prompt=[50, 51, 52], max_tokens=3, echo=True, temperature=0,
                                      extra_body=IGNORE_EOS)
    assert parts[0].choices[0].text == server.codec.decode([50, 51, 52])
    assert "".join(p.choices[0].text for p in parts) == plain.choices[0].text


def test_chat_logprobs_top_logprobs_and_n(served, client):
    server, _, folder = served
    msgs = [{"role": "user", "content": "hi"}]
    r = client.chat.completions.create(model="legal", messages=msgs, max_tokens=4, temperature=0, n=2,
                                       logprobs=True, top_logprobs=2, extra_body=IGNORE_EOS)
    assert [c.index for c in r.choices] == [0, 1] and r.choices[0].message.content == r.choices[1].message.content
    entries = r.choices[0].logprobs.content
    ids = server.codec.chat(msgs)
    gen = [ord(e.token) for e in entries]  # the byte vocabulary: ids < 128 are one ASCII character
    lp = ref_logprobs(reference(folder, "legal"), ids + gen)
    for j, (e, t) in enumerate(zip(entries, gen)):
        row = lp[len(ids) - 1 + j]
        assert t == int(row.argmax()) and e.bytes == [t] and len(e.top_logprobs) == 2
        torch.testing.assert_close(torch.tensor([e.logprob] + [a.logprob for a in e.top_logprobs]),
                                   torch.cat([row[t:t + 1], row.topk(2).values]), **TOL)
    streamed = [c for part in client.chat.completions.create(model="legal", messages=msgs, max_tokens=4,
                                                              temperature=0, logprobs=True, stream=True,
                                                              extra_body=IGNORE_EOS)
                for c in part.choices if c.logprobs is not None]
    assert [e.logprob for c in streamed for e in c.logprobs.content] == pytest.approx([e.logprob for e in entries])


# ---- (2) every field refused by name, the error classes ------------------------------------------------------
@pytest.mark.parametrize("field,value", [("suffix", "x"), ("response_format", {"type": "json_object"}),
                                         ("tools", [{"type": "function", "function": {"name": "f"}}]),
                                         ("tool_choice", "auto"), ("functions", [{"name": "f"}]),
                                         ("user", "u1"), ("made_up_field", 1)])
def test_unsupported_fields_are_refused_by_name(client, field, value):
    for call in (lambda: client.completions.create(model="legal", prompt="x", extra_body={field: value}),
                 lambda: client.chat.completions.create(model="legal", messages=[{"role": "user", "content": "x"}],
                                                        extra_body={field: value})):
        with pytest.raises(openai.BadRequestError) as exc:
            call()
        assert exc.value.status_code == 400 and exc.value.param == field and field in exc.value.message


@pytest.mark.parametrize("body", [
    {"temperature": -1}, {"n": 0}, {"n": 2, "best_of": 1}, {"logprobs": 21}, {"top_k": -2}, {"min_p": 1.5},
    {"frequency_penalty": 3}, {"repetition_penalty": 0}, {"logit_bias": {"128": 1}}, {"logit_bias": {"x": 1}},
    {"logit_bias": {"5": 101}}, {"logit_bias": {"9" * 5000: 1}}, {"logit_bias": {"\u0665": 1}},
    {"best_of": 2, "stream": True}, {"prompt": []}, {"prompt": [[]]},
    {"max_tokens": 33}, {"stream_options": {"include_usage": True, "other": 1}}])
def test_bad_values_are_400_with_the_openai_shape(http, body):
    r = http.post("/v1/completions", json={"model": "legal", "prompt": "x", **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and set(err) == {"message", "type", "param", "code"}


def test_chat_refuses_top_logprobs_without_logprobs_and_non_text_parts(client):
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model="legal", messages=[{"role": "user", "content": "x"}], top_logprobs=2)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="legal", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x"}}]}])


def test_error_classes_of_the_openai_client(served, client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    with pytest.raises(openai.AuthenticationError):
        client.post("/adapters", body={"name": "legal"}, cast_to=object)
    admin = openai.OpenAI(base_url=f"{served[1].url}/v1", api_key=ADMIN["Authorization"].split()[1], max_retries=0)
    with pytest.raises(openai.ConflictError):
        admin.post("/adapters", body={"name": "legal"}, cast_to=object)
    with pytest.raises(openai.APIStatusError) as exc:  # more rows than the queue can ever hold: 413
        client.completions.create(model="legal", prompt=["a"] * 9, max_tokens=1)
    assert exc.value.status_code == 413


# ---- (4) models, served names, tokenize -----------------------------------------------------------------------
def test_models_retrieve(served, client):
    assert client.models.retrieve("legal").parent == "tiny-llama"
    assert client.models.retrieve("tiny-llama").id == "tiny-llama"
    assert client.models.retrieve("legal:0.5+tone:0.5").id == "legal:0.5+tone:0.5"
    assert client.models.retrieve("base").id == "base"


@pytest.mark.compile
def test_serve_compile_flag(one_thread):
    """--compile serves through the compiled decode step, compiled at start (the request compiles nothing more), with
    the greedy tokens of --no-compile (the default)."""
    from torch._dynamo.utils import counters

    servers = [build_server(cli.build_parser().parse_args(
        ["serve", "--base", "tiny-llama", "--max-prompt-tokens", "64", "--max-new-tokens", "32", *flag]))
        for flag in (["--compile"], ["--no-compile"], [])]
    assert [s.model.compiled for s in servers] == [True, False, False]
    torch._dynamo.reset()  # an earlier test's graph for the same config would otherwise be reused
    before = counters["stats"]["unique_graphs"]
    servers[0].start()  # warm-up: the one decode graph
    try:
        compiled = counters["stats"]["unique_graphs"]
        assert compiled == before + 1
        got = [s.engine.generate([5, 9, 13], "tiny-llama",
                                 SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)).token_ids
               for s in servers[:2]]
    finally:
        servers[0].stop()
    assert servers[0].model.compiled and got[0] == got[1]
    assert counters["stats"]["unique_graphs"] == compiled


def test_max_prefill_tokens_flag_reaches_the_engine(one_thread):
    """--max-prefill-tokens sets EngineConfig.max_prefill_tokens (default: the config's); below 1 is refused."""
    base = ["serve", "--base", "tiny-llama", "--max-prompt-tokens", "64", "--max-new-tokens", "32"]
    default = build_server(cli.build_parser().parse_args(base))
    assert default.engine.config.max_prefill_tokens == EngineConfig.max_prefill_tokens
    assert build_server(cli.build_parser().parse_args([*base, "--max-prefill-tokens", "100"])
                        ).engine.config.max_prefill_tokens == 100
    with pytest.raises(ConfigError, match="max_prefill_tokens must be an integer >= 1, got 0"):
        build_server(cli.build_parser().parse_args([*base, "--max-prefill-tokens", "0"]))


def test_served_model_name(tmp_path, one_thread):
    args = cli.build_parser().parse_args(["serve", "--base", "tiny-llama", "--max-prompt-tokens", "64",
                                          "--max-new-tokens", "32",
                                      "--served-model-name", "mine", "alias"])
    server = build_server(args)
    assert server.base_id == "mine" and server.base_ids == ("mine", "alias", "base")
    assert server.engine.parse_model("alias") == () and server.engine.parse_model("mine") == ()
    with pytest.raises(ConfigError, match="--served-model-name"):
        check_args(cli.build_parser().parse_args(["serve", "--base", "tiny-llama", "--served-model-name", " "]))
    loop = LoopbackServer(create_app(server)).start()
    try:
        c = openai.OpenAI(base_url=f"{loop.url}/v1", api_key="x", max_retries=0)
        assert [m.id for m in c.models.list()] == ["mine", "alias"]
        r = c.completions.create(model="alias", prompt="ab", max_tokens=2, temperature=0)
        assert r.model == "alias"
    finally:
        loop.stop()


def test_tokenize_and_detokenize(served, http):
    server, _, _ = served
    r = http.post("/tokenize", json={"model": "legal", "prompt": "hello", "return_token_strs": True}).json()
    assert r["tokens"] == server.codec.encode("hello") and r["count"] == 5 and r["token_strs"] == list("hello")
    assert r["max_model_len"] == server.engine.context
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["tokens"] == server.codec.chat([{"role": "user", "content": "hi"}]) and chat["token_strs"] is None
    assert http.post("/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": "hello"}
    assert http.post("/detokenize", json={"tokens": [500]}).status_code == 400
    assert http.post("/tokenize", json={"model": "nope", "prompt": "x"}).status_code == 404
    assert http.post("/tokenize", json={"prompt": "x", "messages": [{"role": "user", "content": "x"}]}
                     ).status_code == 400


# ---- (3) the sampler: adjustments against the slow reference, per row --------------------------------------------
@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 10**6), scale=st.sampled_from([0.5, 3.0, 30.0]),
       t=st.sampled_from([0.0, 0.3, 1.0, 2.0]), top_p=st.sampled_from([1.0, 0.9, 0.3]),
       top_k=st.sampled_from([0, -1, 1, 3, 40, 100]), min_p=st.sampled_from([0.0, 0.05, 0.5]),
       freq=st.sampled_from([0.0, 0.5, -1.5]), pres=st.sampled_from([0.0, 1.0, -0.5]),
       rep=st.sampled_from([1.0, 1.3, 0.7]), nbias=st.integers(0, 3))
def test_distribution_equals_the_slow_reference(seed, scale, t, top_p, top_k, min_p, freq, pres, rep, nbias):
    g = torch.Generator().manual_seed(seed)
    V = 48
    logits = torch.randn(V, generator=g) * scale
    prompt = torch.randint(0, V, (5,), generator=g).tolist()
    output = torch.randint(0, V, (7,), generator=g).tolist()
    bias = tuple((int(i), float(b)) for i, b in zip(torch.randint(0, V, (nbias,), generator=g).unique(),
                                                    torch.randn(nbias, generator=g) * 20))
    p = SamplingParams(temperature=t, top_p=top_p, top_k=top_k, min_p=min_p, frequency_penalty=freq,
                       presence_penalty=pres, repetition_penalty=rep, logit_bias=bias)
    want = torch.tensor(reference_distribution(logits.tolist(), p, prompt, output))
    atol, rtol = tolerance(torch.float32)
    torch.testing.assert_close(distribution(logits, p, prompt, output), want, atol=atol, rtol=rtol)


@pytest.mark.parametrize("kind", ["flat", "ties", "peaked"])
@pytest.mark.parametrize("top_p,min_p", [(0.95, 0.0), (0.5, 0.0), (0.9, 0.3), (1.0, 0.5)])
def test_sort_free_nucleus_equals_the_slow_reference_over_a_large_vocabulary(kind, top_p, min_p):
    """The sort-free `_nucleus` over 6,000 tokens: flat logits keep thousands, integer logits tie at the boundary
    (the reference keeps the first ties in vocabulary order, as `_nucleus`)."""
    g = torch.Generator().manual_seed(7)
    logits = {"flat": torch.randn(6000, generator=g) * 0.3, "ties": torch.randint(0, 4, (6000,), generator=g).float(),
              "peaked": torch.randn(6000, generator=g) * 4}[kind]
    p = SamplingParams(temperature=1.0, top_p=top_p, min_p=min_p)
    want = torch.tensor(reference_distribution(logits.tolist(), p, [], []))
    got = distribution(logits, p)
    assert ((got > 0) == (want > 0)).all()  # the same kept set
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


SAMPLED_ROWS = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_p=0.8),
                SamplingParams(temperature=1.5, top_k=3), SamplingParams(temperature=1.0, min_p=0.2, top_p=0.9),
                SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, presence_penalty=1.0),
                SamplingParams(temperature=1.2, top_k=5, top_p=0.7, min_p=0.1), SamplingParams(temperature=1.0, min_p=0.3)]


def test_sampled_tokens_follow_the_distribution():
    """Drawn tokens: each row's frequencies over 6,000 seeded draws equal `distribution` (within 0.03, 4.6
    standard deviations at p = 0.5), in each of the sampler's groups (no filter, min_p / top_p, top_k), a greedy
    row and a penalised one beside them."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(len(SAMPLED_ROWS), 8, generator=g) * 1.5
    ctx = [([1, 2], [3, 3, 4])] * len(SAMPLED_ROWS)
    gens = [torch.Generator().manual_seed(10 + b) for b in range(len(SAMPLED_ROWS))]
    n = 6000
    counts = torch.zeros(len(SAMPLED_ROWS), 8)
    for _ in range(n):
        tok = sample_next(logits, SAMPLED_ROWS, gens, ctx)
        counts[torch.arange(len(SAMPLED_ROWS)), tok] += 1
    want = torch.stack([distribution(logits[b], p, *ctx[b]) for b, p in enumerate(SAMPLED_ROWS)])
    assert (counts / n - want).abs().max() < 0.03
    assert (counts[want == 0] == 0).all()  # a dropped token is never drawn


def test_a_seeded_row_draws_the_same_tokens_whatever_else_is_in_its_batch():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(len(SAMPLED_ROWS), 300, generator=g) * 2
    ctx = [([1, 2], [3, 3, 4])] * len(SAMPLED_ROWS)

    def draws(rows: list[int]) -> list[list[int]]:
        gens = [torch.Generator().manual_seed(100 + b) for b in rows]
        return [sample_next(logits[rows], [SAMPLED_ROWS[b] for b in rows], gens, [ctx[b] for b in rows]).tolist()
                for _ in range(20)]

    together = draws(list(range(len(SAMPLED_ROWS))))
    for b in range(len(SAMPLED_ROWS)):
        assert [d[0] for d in draws([b])] == [d[b] for d in together]


def test_adjustments_of_a_batch_equal_each_row_adjusted_alone():
    """adjust_logits works on n rows at once (each row's ids offset into its own part): bit for bit what each row
    gets alone, whatever penalties its neighbours have (none, the same ids, other values)."""
    g = torch.Generator().manual_seed(3)
    V = 40
    params = [SamplingParams(), SamplingParams(repetition_penalty=1.3, logit_bias=((5, 3.0), (5, -1.0))),
              SamplingParams(frequency_penalty=0.5, presence_penalty=-0.5),
              SamplingParams(repetition_penalty=0.7, frequency_penalty=-1.5, presence_penalty=1.0,
                             logit_bias=((39, 100.0),)),
              SamplingParams(frequency_penalty=2.0)]
    contexts = [(torch.randint(0, V, (int(n),), generator=g).tolist(), torch.randint(0, V, (int(m),), generator=g).tolist())
                for n, m in torch.randint(1, 12, (len(params), 2), generator=g)]
    contexts[4] = (contexts[4][0], [])  # penalties with no output yet
    logits = torch.randn(len(params), V, generator=g) * 5
    batch = sampling.adjust_logits(logits, params, contexts)
    for b, p in enumerate(params):
        assert torch.equal(batch[b], sampling.adjust_logits(logits[b:b + 1], [p], [contexts[b]])[0])
    assert torch.equal(batch[0], logits[0]) and not torch.equal(batch[1], logits[1])


def test_logit_bias_and_penalties_act_per_row_in_one_batch(tmp_path):
    _, eng, _ = build(tmp_path, ["r1"])
    plain = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    alone = eng.generate([5, 6, 7], "r1", plain).token_ids
    forced = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logit_bias=((77, 100.0),))
    fresh = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, presence_penalty=2.0,
                           repetition_penalty=100.0)
    hs = [eng.submit([5, 6, 7], "r1", p) for p in (plain, forced, fresh)]
    while not all(h.done for h in hs):
        eng.step()
    a, b, c = (h.result().token_ids for h in hs)
    assert a == alone and b == [77] * 8
    assert len(set(c)) == len(c) and not set(c) & {5, 6, 7}  # a repeated token always loses at penalty 100


def test_penalised_greedy_decoding_equals_a_slow_loop_over_peft(tmp_path):
    """Greedy with frequency/presence/repetition penalties and a bias: the engine's tokens equal a loop that
    runs the PEFT model on the whole sequence and takes the reference distribution's argmax each step."""
    _, eng, _ = build(tmp_path, ["r1"])
    p = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, frequency_penalty=0.7,
                       presence_penalty=0.3, repetition_penalty=1.5, logit_bias=((9, 2.0),))
    prompt = [5, 6, 7]
    got = eng.generate(prompt, "r1", p).token_ids
    ref = reference(tmp_path, "r1")
    out: list[int] = []
    for _ in range(6):
        with torch.no_grad():
            logits = ref(torch.tensor([prompt + out])).logits[0, -1].float()
        dist = reference_distribution(logits.tolist(), p, prompt, out)
        out.append(max(range(len(dist)), key=dist.__getitem__))
    assert got == out


@settings(max_examples=200, deadline=None)
@given(top_k=NUMBERS, min_p=NUMBERS, freq=NUMBERS, pres=NUMBERS, rep=NUMBERS, bias=NUMBERS, t=NUMBERS,
       scale=st.sampled_from([1.0, 1e-30, 1e30, 3e38]), rng=st.integers(0, 99))
def test_new_sampling_fields_accept_only_values_the_sampler_can_use(top_k, min_p, freq, pres, rep, bias, t, scale,
                                                                     rng):
    """The issue-15 rule for the issue-18 fields: whatever SamplingParams accepts, the sampler turns any
    finite logits (up to float32's largest) into a valid token; whatever it refuses is a ConfigError."""
    try:
        p = SamplingParams(temperature=t, top_k=top_k, min_p=min_p, frequency_penalty=freq, presence_penalty=pres,
                           repetition_penalty=rep, logit_bias=((3, bias),))
    except ConfigError:
        return
    g = torch.Generator().manual_seed(rng)
    logits = (torch.randn(1, 64, generator=g) * scale).clamp(-3e38, 3e38)  # (1, 64) finite
    ctx = [(torch.randint(0, 64, (4,), generator=g).tolist(), torch.randint(0, 64, (6,), generator=g).tolist())]
    tok = int(sample_next(logits, [p], [p.generator(logits.device)], ctx)[0])
    assert 0 <= tok < 64 and torch.isfinite(distribution(logits[0], p, *ctx[0])).all()


def test_sampling_bounds_refuse_what_breaks_the_math():
    for bad in [dict(top_k=-2), dict(top_k=1.5), dict(min_p=-0.1), dict(min_p=float("nan")),
                dict(frequency_penalty=2.5), dict(presence_penalty=float("inf")), dict(repetition_penalty=0),
                dict(repetition_penalty=101), dict(logit_bias=((-1, 1.0),)), dict(logit_bias=((1, 101.0),)),
                dict(logit_bias=((1, float("nan")),)), dict(logprobs=21), dict(prompt_logprobs=-1),
                dict(logprobs=True)]:
        with pytest.raises(ConfigError):
            SamplingParams(**bad)


# ---- (5) incremental detokenization --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol_codec(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    return TextCodec.for_model(tok, type("C", (), {"eos_token_id": tok.eos_token_id})())


class _Counting:
    """A TextCodec stand-in that records the length of every id list it decodes."""

    def __init__(self, codec: TextCodec) -> None:
        self.codec, self.lengths = codec, []

    def decode(self, ids):
        self.lengths.append(len(ids))
        return self.codec.decode(ids)


@settings(max_examples=60, deadline=None)
@given(prompt=st.text(min_size=1, max_size=20), text=st.text(min_size=1, max_size=60))
def test_incremental_detokenizer_never_garbles_or_repeats(smol_codec, prompt, text):
    """Any text (emoji, CJK, combining marks: characters split over several byte-level tokens), pushed token
    by token after any prompt: the deltas join to exactly the text, none holds a replacement character, and
    each push decodes a short window, not the whole text."""
    tok = smol_codec.tokenizer
    p_ids = tok.encode(prompt, add_special_tokens=False)
    ids = tok.encode(text, add_special_tokens=False)
    counting = _Counting(smol_codec)
    d = Detokenizer(counting, (), p_ids)
    deltas = [d.push(i) for i in ids] + [d.flush()]
    assert "".join(deltas) == d.text == tok.decode(ids)
    if "\ufffd" not in tok.decode(ids):  # (a character outside the tokenizer's byte tokens cannot come back)
        assert not any("\ufffd" in x for x in deltas)
        assert max(counting.lengths, default=0) <= 5 + 8  # the prompt context and at most one character's tokens


def test_detokenizer_cost_does_not_grow_with_the_text(smol_codec):
    ids = smol_codec.tokenizer.encode("word " * 300, add_special_tokens=False)
    counting = _Counting(smol_codec)
    d = Detokenizer(counting, ("STOP",), [1, 2, 3])
    text = "".join(d.push(i) for i in ids) + d.flush()
    assert text == "word " * 300 and max(counting.lengths) <= 6


# ---- (7) prometheus metrics -------------------------------------------------------------------------------
def test_metrics_are_typed_and_count_refusals_and_token_timings(served, http, client):
    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> dict:
        return {f.name: f for f in text_string_to_metric_families(http.get("/metrics").text)}

    def sample(families: dict, family: str, name: str, **labels) -> float:
        return next((s.value for s in families[family].samples if s.name == name and s.labels == labels), 0.0)

    before = scrape()
    http.post("/v1/completions", json={"model": "legal", "prompt": "x", "tools": []})
    http.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    client.completions.create(model="tone", prompt="ab", max_tokens=5, temperature=0, extra_body=IGNORE_EOS)
    after = scrape()
    for family, kind in [("loraplex_requests", "counter"), ("loraplex_requests_refused", "counter"),
                         ("loraplex_generated_tokens", "counter"), ("loraplex_time_to_first_token_seconds",
                                                                     "histogram"),
                         ("loraplex_inter_token_latency_seconds", "histogram"), ("loraplex_queue_waiting", "gauge")]:
        assert after[family].type == kind
    refused = "loraplex_requests_refused"
    for status, code in [("400", "unsupported_field"), ("404", "model_not_found")]:
        n = sample(after, refused, refused + "_total", status=status, code=code)
        assert n == sample(before, refused, refused + "_total", status=status, code=code) + 1
    ttft, itl = "loraplex_time_to_first_token_seconds", "loraplex_inter_token_latency_seconds"
    for family, more in [(ttft, 1), (itl, 4)]:  # 5 tokens: the first, then 4 gaps
        assert sample(after, family, family + "_count", adapter="tone") == \
            sample(before, family, family + "_count", adapter="tone") + more


def test_token_bytes_of_a_byte_level_tokenizer_are_the_raw_bytes(smol_codec):
    """Chat logprobs' `bytes`: pieces of a UTF-8 character (an emoji over several tokens) are their real bytes,
    so joining the tokens' bytes gives the text's UTF-8."""
    text = "h\u00e9llo \u65e5\U0001F642 \u0645\u0631\u062d\u0628\u0627"
    ids = smol_codec.tokenizer.encode(text, add_special_tokens=False)
    assert bytes(b for t in ids for b in smol_codec.token_bytes(t)) == text.encode("utf-8")
    assert smol_codec.token_bytes(smol_codec.tokenizer.eos_token_id) == list(b"<|im_end|>")
