"""The tiny trainable base and data the training, device and CLI tests share: a tiny random Llama saved with a
character-level tokenizer, two small JSONL sets, and adapter-file comparisons."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import loraplex.train.checkpoint as ckpt_mod
from loraplex.functional import tolerance
from loraplex.models import tiny_llama
from loraplex.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = "adapter_model.safetensors"
TORCHRUN = Path(shutil.which("torchrun") or Path(sys.executable).with_name("torchrun"))
FSDP_SETTINGS = dict(max_length=64, eval_split=0.25, lr=1e-2, max_steps=24, grad_accum=2, seed=3, dropout=0.0,
                     max_grad_norm=0.5, eval_every=12, device="cpu")  # gloo; one GPU cannot hold 2 ranks


def make_tiny_base(directory: Path) -> Path:
    """tiny_llama(seed=0) (vocab 128) + a character-level tokenizer (printable ASCII, ids 4..98)."""
    from tokenizers import Tokenizer
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({chr(c): len(vocab) + i for i, c in enumerate(range(32, 127))})
    core = Tokenizer(BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # no merges: one token per character
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    tiny_llama(seed=0).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def write_data(directory: Path) -> dict[str, Path]:
    """a.jsonl: 24 prompt/completion sums; b.jsonl: 16 short texts."""
    directory.mkdir(parents=True, exist_ok=True)
    a, b = directory / "a.jsonl", directory / "b.jsonl"
    a.write_text("".join(json.dumps({"prompt": f"add {i} and {i + 1}", "completion": f"= {2 * i + 1}"}) + "\n"
                         for i in range(24)))
    b.write_text("".join(json.dumps({"text": f"the {['cat', 'dog', 'owl', 'fox'][i % 4]} number {i} sat"}) + "\n"
                         for i in range(16)))
    return {"a": a, "b": b}


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    return make_tiny_base(tmp_path_factory.mktemp("tiny_base"))


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> dict[str, Path]:
    return write_data(tmp_path_factory.mktemp("data"))


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / WEIGHTS))


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], exact: bool = True) -> None:
    assert a.keys() == b.keys()
    atol, rtol = (0.0, 0.0) if exact else tolerance(torch.float32)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=rtol, msg=lambda m, k=k: f"{k}: {m}")


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}


def config(base: Path, data_paths, out: Path, **kw) -> TrainConfig:
    settings = dict(batch_size=4, max_length=64, eval_split=0.25, lr=1e-2, max_steps=6, seed=3, progress=False)
    settings.update(kw)
    return TrainConfig(base=str(base), data=[str(d) for d in data_paths], out=out, **settings)


def crash_at_second_checkpoint_then_resume(monkeypatch, base: Path, data_path: Path, tmp_path: Path, **kw):
    """Train to the end in tmp_path/whole; then again in tmp_path/crashed with the second checkpoint dying half
    written (a simulated full disk), checked to leave checkpoint #1 (step 2 for save_every=2) in place, and resume
    it. Returns (uninterrupted result, resumed result)."""
    whole = train(config(base, [data_path], tmp_path / "whole", **kw))
    real_save, calls = torch.save, []

    def failing_save(obj, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return real_save(obj, path, *a, **k)

    out = tmp_path / "crashed"
    monkeypatch.setattr(ckpt_mod.torch, "save", failing_save)
    with pytest.raises(OSError, match="simulated"):
        train(config(base, [data_path], out, **kw))
    monkeypatch.undo()
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == kw["save_every"]
    return whole, train(config(base, [data_path], out, resume=True, **kw))


def flags(settings: dict) -> list[str]:
    out = []
    for k, v in settings.items():
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out


def finish(run: subprocess.Popen, timeout: float = 300) -> str:
    try:
        stdout, stderr = run.communicate(timeout=timeout)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, stdout[-2000:] + stderr[-3000:]
    return stdout
