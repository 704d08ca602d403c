"""lm-evaluation-harness against `loraplex serve`, unchanged: its `local-completions` backend (batch size 4,
so several prompts per request) on a small offline task with a loglikelihood (multiple-choice) part and a
generate_until part, for the base and for an adapter. The oracle is lm-eval's own `hf` backend with
`peft=`: the same accuracies, the same per-choice loglikelihoods (float32 tolerance), the same generations.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from serve_helpers import LoopbackServer

import loraplex as lp
from loraplex import models
from loraplex.serve import EngineConfig
from loraplex.serve.app import Server, create_app

lm_eval = pytest.importorskip("lm_eval")  # a test dependency (pyproject [test]); skipped only where absent
pytestmark = [pytest.mark.lm_eval, pytest.mark.usefixtures("one_thread")]

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "fish", "bird"]
DATASET = """\
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
  cache_dir: {cache}
test_split: test
"""  # the part of every task file that names the data
TASKS = """\
task: {name}_mc
""" + DATASET + """\
output_type: multiple_choice
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
"""
GEN = """\
task: {name}_gen
""" + DATASET + """\
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory, smollm2_dir):
    """A tiny random Llama with SmolLM2's tokenizer, one adapter, the task files, a running server."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("lmeval")
    base = models.tiny_llama(seed=0, vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    base.save_pretrained(root / "base")
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    tok.save_pretrained(root / "base")
    model, _ = lp.models.load_base(str(root / "base"))
    lp.inject(model, lp.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
              "quiz", seed=3)
    with torch.no_grad():
        for _, layer in lp.lora_layers(model):
            layer.lora_B["quiz"].weight.mul_(3.0)  # big enough to change answers
    lp.save_adapter(model, "quiz", root / "adapters" / "quiz")
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(8):
        pick = torch.randperm(len(WORDS), generator=g)[:3].tolist()
        rows.append({"question": f"which word is {i}?", "choices": [WORDS[j] for j in pick], "answer": i % 3})
    data = root / "quiz.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "tasks").mkdir()
    cache = root / "datasets-cache"  # nothing is written outside the test's directory
    (root / "tasks" / "mc.yaml").write_text(TASKS.format(name="quiz", data=data, cache=cache))
    (root / "tasks" / "gen.yaml").write_text(GEN.format(name="quiz", data=data, cache=cache))
    hf, tokenizer = lp.models.load_base(str(root / "base"))
    server = Server(hf, tokenizer, base_id="tiny", adapters_dir=root / "adapters",
                    config=EngineConfig(max_batch=8, max_queue=64, max_prompt_tokens=96, max_new_tokens=32))
    loop = LoopbackServer(create_app(server)).start()
    yield root, loop
    loop.stop()


def evaluate(root, model: str, model_args: dict) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    return simple_evaluate(model=model, model_args=model_args, tasks=["quiz_mc", "quiz_gen"], batch_size=4,
                           task_manager=TaskManager(include_path=str(root / "tasks")), log_samples=True,
                           device="cpu", random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                           fewshot_random_seed=0)


def per_item(out: dict, task: str) -> list:
    return [s["resps"] for s in sorted(out["samples"][task], key=lambda s: s["doc_id"])]


@pytest.mark.parametrize("adapter", [None, "quiz"])
def test_lm_eval_local_completions_equals_hf_peft(setup, adapter, monkeypatch):
    root, loop = setup
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # local JSON only
    served = evaluate(root, "local-completions", {
        "base_url": f"{loop.url}/v1/completions", "model": adapter or "tiny", "tokenizer_backend": "huggingface",
        "tokenizer": str(root / "base"), "tokenized_requests": True, "num_concurrent": 1, "max_retries": 1,
        "max_length": 96})
    oracle = evaluate(root, "hf", {"pretrained": str(root / "base"), "dtype": "float32", "max_length": 96,
                                   **({"peft": str(root / "adapters" / adapter)} if adapter else {})})
    assert served["results"]["quiz_mc"]["acc,none"] == oracle["results"]["quiz_mc"]["acc,none"]
    assert served["results"]["quiz_gen"]["exact_match,none"] == oracle["results"]["quiz_gen"]["exact_match,none"]
    got, want = per_item(served, "quiz_mc"), per_item(oracle, "quiz_mc")
    ll = lambda items: torch.tensor([[float(c[0][0]) for c in doc] for doc in items])  # noqa: E731 (doc, choice)
    atol, rtol = lp.tolerance(torch.float32)  # sums of token logprobs of two decoders: 10x one comparison
    torch.testing.assert_close(ll(got), ll(want), atol=10 * atol, rtol=10 * rtol)
    assert [[bool(c[0][1]) for c in doc] for doc in got] == [[bool(c[0][1]) for c in doc] for doc in want]
    assert per_item(served, "quiz_gen") == per_item(oracle, "quiz_gen")
