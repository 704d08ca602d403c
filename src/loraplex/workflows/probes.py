"""Probe sets, reference logits and the metrics that compare a model's logits with them; golden-logit files.

A probe set is a right-padded batch of token ids: input_ids (N, T), attention_mask (N, T), 1 = real token.
Only the P = attention_mask.sum() real positions are ever compared. A reference holds, per position, either
the full logits (P, V) or the top-k logits (P, k) with their token ids and the full row's logsumexp (P,).

Metrics of variant logits v against reference logits r (both (P, V), v cast to fp32, KL in float64):
    max_abs     = max |v - r|                                      over compared entries
    worst_ratio = max |v - r| / (atol + rtol * max_j |r_j|)        <= 1 means "within tolerance"
                  (normwise per position: the error of a logit row comes from the error of the hidden state
                  times the output head, so it scales with the row's size, not with each logit's own size)
    kl          = mean over positions of KL(softmax r || softmax v)   in nats
    agree       = share of positions where argmax v == argmax r       (greedy next-token agreement)
With a top-k reference, max_abs/worst_ratio cover the k stored tokens and KL is taken over k + 1 outcomes
(the k tokens and one bucket for all others): a lower bound on the full KL that loses only the tail's shape.

Golden files, written into an adapter directory beside PEFT's two files (which they never touch):
    golden.safetensors  input_ids (N, T) int64, attention_mask (N, T) int64, and either
                        logits (P, V) fp32                     when P * V * 4 bytes <= FULL_LOGITS_MAX_BYTES
                        top_values (P, k) fp32, top_indices (P, k) int32, logsumexp (P,) fp64,
                        absmax (P,) fp32 (max_j |r_j| of the full row)                           otherwise
    golden.json         format, the adapter's content hash, base name + fingerprint, probe source, sha256 of
                        golden.safetensors (so a torn pair of writes is detected)
Sizes: tiny-llama (8 random rows of 18-32 tokens, 200 positions, V=128) stores full logits, ~100 KB; SmolLM2
(V=49152) stores top-64, ~0.5 KB per position (63 KB for the 8 built-in prompts, 114 positions).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import AdapterFileError, ConfigError, ShapeMismatchError
from ..outputs import PathLike

GOLDEN_TENSORS = "golden.safetensors"
GOLDEN_JSON = "golden.json"
GOLDEN_FORMAT = "loraplex.golden/1"
FULL_LOGITS_MAX_BYTES = 1 << 20  # store full logits up to 1 MiB, else top-k
TOP_K = 64
KL_CHUNK = 64  # positions per float64 softmax chunk (bounds memory for large vocabularies)

# Built-in probes: short, varied (chat, code, arithmetic, lists, other languages, structured text).
DEFAULT_PROMPTS = (
    "The quickest way to boil an egg is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Question: what is 17 plus 25?\nAnswer:",
    "Three things to pack for a rainy weekend:\n1.",
    "La capitale de l'Italie est",
    '{"name": "loraplex", "version": "0.1", "tags": [',
    "User: Can you summarize the water cycle in one sentence?\nAssistant:",
    "Once upon a time, in a village at the edge of the forest,",
)


@dataclass
class Probes:
    """A probe batch, right-padded. `source` says where it came from (prompts or seeded random ids)."""

    input_ids: torch.Tensor  # (N, T) int64
    attention_mask: torch.Tensor  # (N, T) int64, 1 = real token
    source: str

    @property
    def positions(self) -> int:
        return int(self.attention_mask.sum())


def make_probes(tokenizer: Any, prompts: Optional[Sequence[str]], *, vocab_size: int, max_length: int = 32,
                count: int = 8, seed: int = 0) -> Probes:
    """Tokenize `prompts` (default DEFAULT_PROMPTS) with `tokenizer`, each cut to `max_length` tokens; without
    a tokenizer, `count` rows of seeded random ids in [0, vocab_size) of lengths max_length down to ~max_length/2."""
    if max_length < 1:
        raise ConfigError(f"max_length must be >= 1, got {max_length}")
    if tokenizer is None:
        if prompts is not None:
            raise ConfigError("prompts need a tokenizer, but this base has none; omit the prompts to use "
                              "random token ids, or pass a base directory that holds a tokenizer")
        gen = torch.Generator().manual_seed(seed)
        lengths = [max(1, max_length - i * max_length // (2 * count)) for i in range(count)]
        rows = [torch.randint(0, vocab_size, (n,), generator=gen).tolist() for n in lengths]
        return _pad(rows, 0, f"{count} random id rows (seed {seed}, up to {max_length} tokens)")
    texts = list(DEFAULT_PROMPTS if prompts is None else prompts)
    if not texts:
        raise ConfigError("the prompt list is empty; give at least one prompt")
    rows = []
    for text in texts:
        ids = list(tokenizer(text)["input_ids"])[:max_length]
        if not ids:
            raise ConfigError(f"prompt {text!r} tokenizes to no tokens; remove it")
        rows.append(ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    origin = "built-in prompts" if prompts is None else "prompts"
    return _pad(rows, pad, f"{len(rows)} {origin} (up to {max_length} tokens)")


def read_prompts(path: str) -> list[str]:
    """Prompts from a text file, one per line; blank lines are skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read prompts file {path!r}: {exc}") from None
    prompts = [ln for ln in lines if ln.strip()]
    if not prompts:
        raise ConfigError(f"prompts file {path!r} holds no non-empty line; write one prompt per line")
    return prompts


def _pad(rows: list[list[int]], pad_id: int, source: str) -> Probes:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return Probes(ids, mask, source)


@torch.no_grad()
def run_logits(model: nn.Module, probes: Probes) -> torch.Tensor:
    """The model's logits on the probe batch: (N, T, V) on the CPU, in the dtype the model computed them in."""
    device = next(model.parameters()).device
    out = model(input_ids=probes.input_ids.to(device), attention_mask=probes.attention_mask.to(device))
    return out.logits.cpu()


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """transformers' save/load progress bars off inside the block (restored after): one table, no noise."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def from_pretrained(directory: PathLike) -> nn.Module:
    """The deployment as anyone would load it: plain AutoModelForCausalLM.from_pretrained, no loraplex."""
    from transformers import AutoModelForCausalLM

    with no_progress_bars():
        return AutoModelForCausalLM.from_pretrained(directory).eval()


def at_positions(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N, T, V) -> (P, V): the rows of real tokens, in row-major order."""
    return logits[mask.bool()]


@dataclass
class Reference:
    """Reference logits at the P probe positions: full (`indices` None, values (P, V)) or top-k."""

    values: torch.Tensor  # (P, V) full, or (P, k) top-k logits, fp32
    logsumexp: torch.Tensor  # (P,) float64, over the full vocabulary (float64 so log p = r - lse is exact)
    absmax: torch.Tensor  # (P,) fp32, max_j |r_j| over the full vocabulary: the scale of rtol
    vocab_size: int
    indices: Optional[torch.Tensor] = None  # (P, k) token ids of `values`, or None for full logits

    @classmethod
    def from_logits(cls, logits: torch.Tensor, top_k: Optional[int] = None) -> "Reference":
        """From (P, V) logits: keep all of them (top_k None or >= V) or the top_k largest per position."""
        logits = logits.float()
        lse, absmax = logits.double().logsumexp(-1), logits.abs().amax(-1)
        if top_k is None or top_k >= logits.shape[-1]:
            return cls(logits, lse, absmax, logits.shape[-1])
        values, indices = logits.topk(top_k, dim=-1)  # (P, k), sorted descending
        return cls(values, lse, absmax, logits.shape[-1], indices)

    @property
    def top1(self) -> torch.Tensor:
        return self.values.argmax(-1) if self.indices is None else self.indices[:, 0].long()


@dataclass(frozen=True)
class Metrics:
    max_abs: float
    worst_ratio: float
    kl: float
    agree: float
    positions: int


@torch.no_grad()
def compare(ref: Reference, logits: torch.Tensor, atol: float, rtol: float) -> Metrics:
    """Metrics (module docstring) of variant `logits` (P, V) against `ref`."""
    if logits.shape[-1] != ref.vocab_size or logits.shape[0] != ref.values.shape[0]:
        raise ShapeMismatchError(f"logits of shape {tuple(logits.shape)} do not match the reference's "
                                 f"{ref.values.shape[0]} positions x vocabulary {ref.vocab_size}")
    v = logits.float()
    picked = v if ref.indices is None else v.gather(-1, ref.indices.long())  # (P, V) or (P, k)
    diff = (picked - ref.values).abs()
    ratio = diff / (atol + rtol * ref.absmax.unsqueeze(-1))
    kls = []
    for s in range(0, v.shape[0], KL_CHUNK):
        kls.append(_kl(ref, v[s:s + KL_CHUNK], slice(s, s + KL_CHUNK)))
    kl = torch.cat(kls) if kls else torch.zeros(0, dtype=torch.float64)
    agree = (v.argmax(-1) == ref.top1).double()
    nan = float("nan")
    return Metrics(float(diff.max()) if diff.numel() else nan, float(ratio.max()) if ratio.numel() else nan,
                   float(kl.mean()) if kl.numel() else nan, float(agree.mean()) if agree.numel() else nan, v.shape[0])


def _kl(ref: Reference, v: torch.Tensor, rows: slice) -> torch.Tensor:
    """KL(ref || v) per position, float64, over the full vocabulary or over the top-k tokens + one tail bucket."""
    log_q = v.double().log_softmax(-1)  # (p, V)
    log_p = ref.values[rows].double() - ref.logsumexp[rows].unsqueeze(-1)  # (p, V) or (p, k)
    if ref.indices is not None:
        log_q = log_q.gather(-1, ref.indices[rows].long())  # (p, k)
    p = log_p.exp()
    kl = (p * (log_p - log_q)).sum(-1)
    if ref.indices is not None:  # the tail bucket: all tokens outside the top-k
        p_rest = (1 - p.sum(-1)).clamp_min(0)
        q_rest = (1 - log_q.exp().sum(-1)).clamp_min(torch.finfo(torch.float64).tiny)
        kl = kl + torch.special.xlogy(p_rest, p_rest) - torch.special.xlogy(p_rest, q_rest)
    return kl.clamp_min(0)  # rounding can leave -1e-17 where the distributions are equal


# -- golden files -------------------------------------------------------------------------------------------
@dataclass
class Golden:
    """Golden logits read from an adapter directory."""

    probes: Probes
    reference: Reference
    facts: dict[str, Any]  # golden.json


def write_golden(adapter_dir: PathLike, probes: Probes, logits: torch.Tensor, facts: dict[str, Any],
                 top_k: Optional[int] = None) -> dict[str, Any]:
    """Store `logits` (N, T, V) of `probes` in adapter_dir (module docstring), each file replaced atomically,
    the tensors first: a crash between the two renames leaves a json whose sha256 no longer matches. Returns
    the json written. Never touches adapter_config.json or adapter_model.safetensors."""
    path, top_k = Path(adapter_dir), TOP_K if top_k is None else top_k
    positions = at_positions(logits, probes.attention_mask)  # (P, V)
    full = positions.numel() * 4 <= FULL_LOGITS_MAX_BYTES
    ref = Reference.from_logits(positions, None if full else top_k)
    tensors = {"input_ids": probes.input_ids.long().contiguous(),
               "attention_mask": probes.attention_mask.long().contiguous()}
    if ref.indices is None:
        tensors["logits"] = ref.values.contiguous()
    else:
        tensors.update(top_values=ref.values.contiguous(), top_indices=ref.indices.to(torch.int32).contiguous(),
                       logsumexp=ref.logsumexp.double().contiguous(), absmax=ref.absmax.contiguous())
    st_tmp = path / f".{GOLDEN_TENSORS}.tmp-{uuid.uuid4().hex[:8]}"
    js_tmp = path / f".{GOLDEN_JSON}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        save_file(tensors, str(st_tmp), metadata={"format": "pt", "loraplex.golden": GOLDEN_FORMAT})
        data = {**facts, "format": GOLDEN_FORMAT, "logits": "full" if full else f"top{top_k}",
                "vocab_size": ref.vocab_size, "positions": probes.positions, "probes": probes.source,
                "sha256": _sha256(st_tmp), "bytes": st_tmp.stat().st_size}
        js_tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        for f in (st_tmp, js_tmp):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(st_tmp, path / GOLDEN_TENSORS)
        os.replace(js_tmp, path / GOLDEN_JSON)
    finally:
        st_tmp.unlink(missing_ok=True)
        js_tmp.unlink(missing_ok=True)
    return data


def read_golden(adapter_dir: PathLike) -> Golden:
    """Read and check golden.json + golden.safetensors of an adapter directory."""
    path = Path(adapter_dir)
    js, st = path / GOLDEN_JSON, path / GOLDEN_TENSORS
    if not js.is_file() or not st.is_file():
        raise AdapterFileError(f"{str(path)!r} holds no golden logits ({GOLDEN_JSON} + {GOLDEN_TENSORS}); "
                               "record them first: loraplex verify --base BASE --adapter DIR --record-golden")
    try:
        facts = json.loads(js.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFileError(f"{js} is not valid JSON: {exc}") from None
    if not isinstance(facts, dict) or facts.get("format") != GOLDEN_FORMAT:
        raise AdapterFileError(f"{js} is not a {GOLDEN_FORMAT} file (format {facts.get('format')!r})"
                               if isinstance(facts, dict) else f"{js} must hold a JSON object")
    if facts.get("sha256") != _sha256(st):
        raise AdapterFileError(f"{st} does not match the sha256 in {js}: the golden files were modified or a "
                               "write was interrupted; record them again")
    try:
        with safe_open(str(st), framework="pt") as fh:
            t = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterFileError(f"{st} is not a readable safetensors file: {exc}") from None
    probes = Probes(t["input_ids"], t["attention_mask"], str(facts.get("probes", "")))
    if "logits" in t:
        ref = Reference.from_logits(t["logits"])
    else:
        ref = Reference(t["top_values"], t["logsumexp"], t["absmax"], int(facts["vocab_size"]), t["top_indices"])
    if ref.values.shape[0] != probes.positions:
        raise AdapterFileError(f"{st} holds {ref.values.shape[0]} positions but its probes have {probes.positions}")
    return Golden(probes, ref, facts)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
