"""Evaluate / promote: the one-pass mixed-batch scores equal a plain per-adapter reference loop; metrics on a
hand-checkable toy model; leaderboard, JSON and chart; promote's directory, parity and card; the CLI end to end."""

from __future__ import annotations

import errno
import json
import math
import shutil
import struct
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import loraplex as lp
from loraplex.cli import main
from loraplex.workflows.plot import plot_results
from loraplex.workflows.evaluate import BASE, EvalResult, _greedy, _normalize, discover_adapters, evaluate
from loraplex.functional import tolerance
from loraplex.models import tiny_llama
from loraplex.errors import OutputExistsError, ParityError, WriteError
from loraplex.workflows.promote import CARD_NAME, REPORT_NAME, _training, promote
from loraplex.train.data import IGNORE_INDEX, Example
from loraplex.workflows.verify import Tolerance

NAMES = ("alpha", "beta")
STOP = 2  # tiny-llama's eos_token_id


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """A folder with two random (non-zero) adapters for tiny_llama(seed=0)."""
    root = tmp_path_factory.mktemp("adapters")
    for i, name in enumerate(NAMES):
        model = tiny_llama(seed=0)
        cfg = lp.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
        lp.inject(model, cfg, name, seed=10 + i)
        lp.save_adapter(model, name, root / name)
    return root


def _examples(n: int = 5, seed: int = 0) -> list[Example]:
    """Random prompt/completion examples of varied lengths (so batches are padded)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        length, prompt = 6 + 3 * k % 7, 2 + k % 3
        ids = torch.randint(3, 128, (length,), generator=g).tolist()
        out.append(Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return out


def _reference_scores(adapters, examples) -> dict[str, tuple[float, float]]:
    """(loss, accuracy) per variant: one adapter active at a time (set_active), one example per forward,
    cross-entropy summed over label != -100 and divided by the number of such tokens."""
    model = tiny_llama(seed=0)
    for name in NAMES:
        lp.load_adapter(model, adapters / name, name, activate=False)
    out = {}
    for variant in (BASE, *NAMES):
        lp.set_active(model, [] if variant == BASE else variant)
        total, correct, count = 0.0, 0, 0
        for e in examples:
            with torch.no_grad():
                logits = model(torch.tensor([e.input_ids])).logits[0, :-1]  # (T-1, V)
            targets = torch.tensor(e.labels[1:])
            keep = targets != IGNORE_INDEX
            total += float(F.cross_entropy(logits[keep], targets[keep], reduction="sum"))
            correct += int((logits[keep].argmax(-1) == targets[keep]).sum())
            count += int(keep.sum())
        out[variant] = (total / count, correct / count)
    return out


def test_loss_and_accuracy_equal_the_reference_loop(adapters):
    examples = _examples()
    model = tiny_llama(seed=0)
    result = evaluate(model, None, adapters, examples, batch_size=2, metrics=("loss", "perplexity", "accuracy"))
    want = _reference_scores(adapters, examples)
    atol, rtol = tolerance(torch.float32)
    assert set(result.scores) == {BASE, *NAMES}
    for variant, (loss, acc) in want.items():
        got = result.scores[variant]
        assert got["loss"] == pytest.approx(loss, abs=10 * atol, rel=10 * rtol)
        assert got["perplexity"] == pytest.approx(math.exp(loss), rel=10 * rtol)
        assert got["accuracy"] == pytest.approx(acc, abs=1e-12)
    assert result.target_tokens == sum(e.num_loss_tokens - (e.labels[0] != IGNORE_INDEX) for e in examples)
    assert not any(True for _ in lp.lora_layers(model)), "evaluate must leave the caller's base bare"


def test_mixed_batches_equal_each_adapter_alone(adapters):
    examples = _examples(4, seed=1)
    together = evaluate(tiny_llama(seed=0), None, adapters, examples, batch_size=3, max_new_tokens=4)
    atol, rtol = tolerance(torch.float32)
    for name in NAMES:
        alone = evaluate(tiny_llama(seed=0), None, {name: adapters / name}, examples, batch_size=1,
                         include_base=False, max_new_tokens=4)
        for metric, value in alone.scores[name].items():
            assert together.scores[name][metric] == pytest.approx(value, abs=10 * atol, rel=10 * rtol), metric


def test_greedy_in_a_padded_mixed_batch_equals_a_plain_loop(adapters):
    model = tiny_llama(seed=0)
    for name in NAMES:
        lp.load_adapter(model, adapters / name, name, activate=False)
    examples, variants = _examples(3, seed=2), [None, *NAMES]
    rows = [e for e in examples for _ in variants]
    got = _greedy(model, rows, variants * len(examples), 0, {STOP}, [5] * len(rows))
    for r, e in enumerate(rows):
        variant = variants[r % len(variants)]
        lp.set_active(model, [] if variant is None else variant)
        ids = e.input_ids[:next(i for i, x in enumerate(e.labels) if x != IGNORE_INDEX)]
        want: list[int] = []
        with torch.no_grad():
            while len(want) < 5 and (not want or want[-1] != STOP):
                want.append(int(model(torch.tensor([ids + want])).logits[0, -1].argmax()))
        assert got[r] == want, (r, variant)


# -- hand-checkable metrics on a toy bigram model -------------------------------------------------------------
class Bigram(nn.Module):
    """logits[t] = head(one_hot(ids[t])): the base predicts token (i + 1) % 8 with logit 10, others 0."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 8, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(10 * _shift(1))
        self.config = SimpleNamespace(eos_token_id=7, pad_token_id=0, name_or_path="bigram")

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
        return SimpleNamespace(logits=self.head(F.one_hot(input_ids, 8).float()))


def _shift(k: int) -> torch.Tensor:
    """P[j, i] = 1 where j == (i + k) % 8: one_hot(i) -> one_hot(i + k)."""
    return torch.stack([F.one_hot(torch.tensor((i + k) % 8), 8) for i in range(8)], 1).float()


@pytest.fixture
def skip_adapter(tmp_path):
    """Adapter `skip` on the head (r=8, scale 1, A = I): base + B @ A predicts (i + 2) % 8."""
    model = Bigram().eval()
    lp.inject(model, lp.LoraConfig(r=8, lora_alpha=8, target_modules=["head"]), "skip")
    a, b = model.head.adapter_tensors("skip")
    with torch.no_grad():
        a.copy_(torch.eye(8))
        b.copy_(10 * (_shift(2) - _shift(1)))
    lp.save_adapter(model, "skip", tmp_path / "skip")
    return tmp_path / "skip"


def test_metrics_by_hand(skip_adapter):
    examples = [
        Example([3, 4, 5, 6, 7], [-100, -100, 5, 6, 7]),  # base: 5 6 7 right, stops -> match; skip: 6 7 0 wrong
        Example([0, 3, 5, 7], [-100, -100, 5, 7]),  # base: 4 6 wrong; skip: 5 7 right, then stops -> match
        Example([2, 3], [2, 3]),  # no prompt: scored for loss/accuracy only; base right, skip wrong
    ]
    result = evaluate(Bigram().eval(), None, {"skip": skip_adapter}, examples, batch_size=2)
    c = math.log(math.exp(10) + 7) - 10  # cross-entropy of a right prediction; a wrong one costs c + 10
    assert result.target_tokens == 6 and result.generated == 2
    assert result.scores[BASE]["loss"] == pytest.approx((4 * c + 2 * (c + 10)) / 6, rel=1e-6)
    assert result.scores["skip"]["loss"] == pytest.approx((2 * c + 4 * (c + 10)) / 6, rel=1e-6)
    assert result.scores["skip"]["perplexity"] == pytest.approx(math.exp(c + 40 / 6), rel=1e-6)
    assert result.scores[BASE]["accuracy"] == pytest.approx(4 / 6)
    assert result.scores["skip"]["accuracy"] == pytest.approx(2 / 6)
    assert result.scores[BASE]["exact_match"] == 0.5 and result.scores["skip"]["exact_match"] == 0.5
    assert result.leaderboard() == [BASE, "skip"] and result.best() == "skip"


def test_exact_match_normalizes_whitespace_and_case():
    words = {1: "Hello", 2: "  ", 3: "WORLD ", 4: "hello world", 5: "!"}
    tok = SimpleNamespace(decode=lambda ids, skip_special_tokens: "".join(words[i] for i in ids))
    assert _normalize([1, 2, 3], tok) == _normalize([4], tok) == "hello world"
    assert _normalize([4, 5], tok) != _normalize([4], tok)
    assert _normalize([4, 5], None) == (4, 5)


# -- results, leaderboard, chart ----------------------------------------------------------------------------------
def _result() -> EvalResult:
    scores = {BASE: {"loss": 2.0, "accuracy": 0.30}, "a": {"loss": 1.5, "accuracy": 0.40},
              "b": {"loss": 1.2, "accuracy": 0.35}, "c": {"loss": float("nan"), "accuracy": float("nan")}}
    info = {n: {"path": f"/x/{n}", "content_hash": n * 64, "r": 8} for n in "abc"}
    return EvalResult("tiny", "data.jsonl", ["loss", "accuracy"], scores, info, 10, 100, 0)


def test_leaderboard_order_json_and_png(tmp_path):
    result = _result()
    assert result.leaderboard() == ["b", "a", BASE, "c"]  # by loss, lower first, NaN last
    assert result.leaderboard("accuracy") == ["a", "b", BASE, "c"]  # higher first
    assert result.best() == "b" and result.best("accuracy") == "a"
    lines = result.table().splitlines()
    assert [ln.split()[1] for ln in lines[2:]] == ["b", "a", BASE, "c"]
    back = EvalResult.load(result.save(tmp_path / "r.json"))
    assert back.leaderboard() == result.leaderboard() and back.adapters == result.adapters
    assert json.loads((tmp_path / "r.json").read_text())["leaderboard"] == ["b", "a", BASE, "c"]
    png = plot_results(result, tmp_path / "chart.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    width, height = struct.unpack(">II", png[16:24])
    assert 400 <= width <= 3000 and 200 <= height <= 1000 and len(png) > 5000


def test_discover_adapters(adapters, tmp_path):
    assert set(discover_adapters(adapters)) == set(NAMES)  # a folder of adapters
    assert list(discover_adapters(adapters / "alpha")) == ["alpha"]  # one adapter directory
    assert list(discover_adapters([f"x={adapters / 'beta'}"])) == ["x"]  # NAME=DIR
    with pytest.raises(lp.ConfigError, match="two adapters are named"):
        discover_adapters([adapters, adapters / "alpha"])
    with pytest.raises(lp.AdapterFileError, match="neither an adapter directory"):
        discover_adapters(tmp_path)


def test_adapter_folders_skip_hidden_entries(adapters, tmp_path):
    """A combine killed after its temporary folder was complete leaves `.mix.tmp-<pid>-<id>` (a whole adapter):
    listing the folder must not pick it up (nor any other hidden entry)."""
    folder = tmp_path / "folder"
    shutil.copytree(adapters, folder)
    shutil.copytree(adapters / "alpha", folder / ".mix.tmp-4242-0badc0de")
    shutil.copytree(adapters / "beta", folder / ".beta.old-12345678")
    assert set(discover_adapters(folder)) == set(NAMES)


@pytest.mark.parametrize("arg,bad", [("limit", -1), ("limit", 0), ("max_new_tokens", 0), ("max_length", -5),
                                     ("batch_size", 2**40), ("eval_split", 1.0), ("eval_split", math.nan),
                                     ("seed", -1), ("limit", 1.5), ("batch_size", True)])
def test_numeric_arguments_are_checked_up_front(adapters, arg, bad):
    with pytest.raises(lp.ConfigError, match=arg):
        evaluate(tiny_llama(seed=0).eval(), None, adapters, _examples(2), metrics=("loss",), **{arg: bad})


def test_results_file_follows_the_overwrite_rule_and_survives_a_full_disk(tmp_path, monkeypatch):
    result, path = _result(), tmp_path / "r.json"
    path.write_text("the user's notes")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        result.save(path)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        plot_results(result, path)
    assert path.read_text() == "the user's notes"

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr("loraplex.outputs.os.fsync", full)
    with pytest.raises(WriteError, match="No space left"):
        result.save(path, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"] and path.read_text() == "the user's notes"
    monkeypatch.undo()
    assert EvalResult.load(result.save(path, overwrite=True)).leaderboard() == result.leaderboard()


def test_promote_never_replaces_what_it_was_not_told_to(adapters, tmp_path):
    out = tmp_path / "deploy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        promote("alpha", tiny_llama(seed=0), adapters, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    before = sorted(p.name for p in (adapters / "alpha").iterdir())
    with pytest.raises(OutputExistsError, match="input"):
        promote("alpha", tiny_llama(seed=0), adapters, adapters / "alpha", overwrite=True)
    assert sorted(p.name for p in (adapters / "alpha").iterdir()) == before
    promote("alpha", tiny_llama(seed=0), adapters, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / CARD_NAME).is_file()


# -- promote --------------------------------------------------------------------------------------------------------
def test_promote_writes_a_loadable_directory_and_card(adapters, tmp_path):
    base = tiny_llama(seed=0)
    results = evaluate(base, None, adapters, _examples(3), metrics=("loss", "accuracy"))
    results.save(tmp_path / "results.json")
    out = tmp_path / "deploy"
    report = promote("best", base, adapters, out, eval_results=tmp_path / "results.json")
    assert report.name == results.best() and report.passed
    assert not any(True for _ in lp.lora_layers(base)), "promote must not change the caller's base"
    deployed = AutoModelForCausalLM.from_pretrained(out)
    on_the_fly = tiny_llama(seed=0)
    af = lp.load_adapter(on_the_fly, adapters / report.name, report.name)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    atol, rtol = tolerance(torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(deployed(ids).logits, on_the_fly(ids).logits, atol=10 * atol, rtol=10 * rtol)
    card = (out / CARD_NAME).read_text()
    assert af.content_hash in card and "PASS" in card
    assert f"Rank {results.leaderboard().index(report.name) + 1} of 3" in card
    assert json.loads((out / REPORT_NAME).read_text())["content_hash"] == af.content_hash


def test_promote_refuses_stale_results_and_failed_parity(adapters, tmp_path, monkeypatch):
    stale = _result()
    stale.adapters["alpha"] = {"content_hash": "0" * 64}
    stale.scores["alpha"] = {"loss": 0.1, "accuracy": 1.0}
    with pytest.raises(lp.ConfigError, match="evaluate it again"):
        promote("best", tiny_llama(seed=0), adapters, tmp_path / "x", eval_results=stale)
    monkeypatch.setattr("loraplex.workflows.promote.tolerance_for", lambda dtype: Tolerance(0.0, 0.0, 0.0))
    with pytest.raises(ParityError, match="nothing written"):
        promote("alpha", tiny_llama(seed=0), adapters, tmp_path / "y")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no staging left behind


# -- the CLI end to end -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_base_with_tokenizer(tmp_path_factory, smollm2_dir):
    """A tiny random Llama with SmolLM2's tokenizer (vocab 49152), two adapters, and chat data."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("cli")
    base = tiny_llama(seed=0, vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    base.save_pretrained(root / "base")
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(root / "base")
    for i, name in enumerate(NAMES):
        model, _ = lp.models.load_base(str(root / "base"))
        lp.inject(model, lp.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                       init_lora_weights=False), name, seed=i)
        lp.save_adapter(model, name, root / "runs" / name)
    summary = {"adapters": {"alpha": {"path": str(root / "runs" / "alpha"), "steps": 7, "train_examples": 9,
                                      "eval_examples": 1, "eval_loss_before": 3.0, "eval_loss_after": 2.0}},
               "data": {"qa.jsonl": {"records": 10, "examples": 10, "skipped": 0, "truncated": 0}},
               "config": {"rank": 2, "lr": 1e-3}}
    (root / "runs" / "train_summary.json").write_text(json.dumps(summary))
    rows = [{"prompt": f"What is {a} plus {a}?", "completion": f"{2 * a}."} for a in range(6)]
    (root / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_cli_eval_then_promote_best(tiny_base_with_tokenizer, capsys):
    root = tiny_base_with_tokenizer
    assert main(["eval", "--base", str(root / "base"), "--adapters", str(root / "runs"), "--data",
                 str(root / "qa.jsonl"), "--limit", "3", "--max-new-tokens", "3", "--batch-size", "2",
                 "--out", str(root / "results.json"), "--plot", str(root / "chart.png"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    results = EvalResult.load(root / "results.json")
    assert results.examples == 3 and set(results.scores) == {BASE, *NAMES}
    board = [ln.split()[1] for ln in out.splitlines() if ln[:1].isdigit()]
    assert board == results.leaderboard()
    assert (root / "chart.png").read_bytes()[:4] == b"\x89PNG"
    best = results.best()
    assert main(["promote", "best", "--base", str(root / "base"), "--adapters", str(root / "runs"),
                 "--results", str(root / "results.json"), "--out", str(root / "deploy")]) == 0
    out = capsys.readouterr().out
    assert f"adapter {best}" in out and "PASS" in out
    card = (root / "deploy" / CARD_NAME).read_text()
    assert results.adapters[best]["content_hash"] in card
    assert ("held-out loss 3 -> 2" in card) == (best == "alpha")  # only alpha has a train_summary.json entry
    assert (root / "deploy" / "tokenizer.json").is_file()
    AutoModelForCausalLM.from_pretrained(root / "deploy")


def test_training_facts_come_from_the_trainers_summary(tmp_path):
    runs = tmp_path / "runs"  # `train --out-per-data` layout: runs/<name>/ + runs/train_summary.json
    (runs / "faq").mkdir(parents=True)
    (runs / "other").mkdir()
    summary = {"adapters": {"faq": {"path": "runs/faq", "steps": 5}},
               "data": {"data/faq.jsonl": {"records": 4}, "chatterbot:food": {"records": 9}}, "config": {"lr": 0.1}}
    (runs / "train_summary.json").write_text(json.dumps(summary))
    facts = _training(runs / "faq")
    assert facts["steps"] == 5 and list(facts["sources"]) == ["data/faq.jsonl"] and facts["config"] == {"lr": 0.1}
    assert _training(runs / "other") is None
    single = tmp_path / "single"  # one adapter per run: the summary sits in the adapter directory
    single.mkdir()
    (single / "train_summary.json").write_text(json.dumps({**summary, "adapters": {"default": {"steps": 2}}}))
    assert _training(single)["steps"] == 2 and len(_training(single)["sources"]) == 2


def test_cli_errors_are_one_line(tiny_base_with_tokenizer, capsys):
    root = tiny_base_with_tokenizer
    assert main(["eval", "--base", str(root / "base"), "--adapters", str(root / "runs"), "--data",
                 str(root / "qa.jsonl"), "--limit", "-1"]) == 1
    assert "limit" in capsys.readouterr().err
    (root / "notes.json").write_text("mine")
    assert main(["eval", "--base", str(root / "base"), "--adapters", str(root / "runs"), "--data",
                 str(root / "qa.jsonl"), "--limit", "1", "--metrics", "loss", "--out", str(root / "notes.json")]) == 1
    assert "--overwrite" in capsys.readouterr().err and (root / "notes.json").read_text() == "mine"
    data = (root / "qa.jsonl").read_text()
    assert main(["eval", "--base", str(root / "base"), "--adapters", str(root / "runs"), "--data",
                 str(root / "qa.jsonl"), "--out", str(root / "qa.jsonl"), "--overwrite"]) == 1
    assert "input" in capsys.readouterr().err and (root / "qa.jsonl").read_text() == data
    assert main(["promote", "nope", "--base", str(root / "base"), "--adapters", str(root / "runs"),
                 "--out", str(root / "x")]) == 1
    assert "no adapter 'nope'" in capsys.readouterr().err
