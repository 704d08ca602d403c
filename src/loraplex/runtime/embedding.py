"""Embedding LoRA and trainable tokens per batch row: the embedding step of a multi-adapter batch.

Semantics, for the input embedding E (vocab, dim), ids (B, L), y = E[ids] (B, L, dim), and row b's assignment
((s_1, w_1), ...), written into y in place (PEFT's embedding LoRA, `lora_embedding_A` (r, vocab),
`lora_embedding_B` (dim, r)):

    y[b] += sum_k w_k * scale[s_k] * A[s_k].T[ids[b]] @ B[s_k].T          # A.T[ids]: (L, r)

A slot stores embedding LoRA like a linear layer's (A (r, vocab), Bt (r, dim)), under the layer key of the
embedding module (registered with `AdapterPool.register_layer(..., embedding=True)`), so budget, eviction,
reload checks and versions are the pool's. A plan gathers the A columns of each row's ids instead of
multiplying by x: `EmbeddingLayer` holds, per distinct assignment, its virtual adapter (`ops.layer_views`: a mix
concatenated along r, exactly) and its rows.

Trainable tokens (PEFT's `trainable_token_indices`: new rows V (n, dim) for token ids I (n,), replacing E[I])
become an exact LoRA of rank n in `token_tensors`: on the embedding A = onehot(I) (n, vocab), B = (V - E[I]).T
(dim, n), scale 1, so y[b, t] = E[I_j] + (V_j - E[I_j]) where ids[b, t] == I_j; and on a tied output head
(logits = h @ W.T with W = E, as PEFT ties it) A = V - W[I] (n, dim), B = onehot(I).T (vocab, n), so the logits
of tokens I are h @ V.T. A mix adds w * (V - E[I]) (a weighted sum of the adapters' changes, as for LoRA).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import ConfigError, ShapeMismatchError, TargetNotFoundError, UnsupportedFeatureError
from ..store import LoraModule, unread_keys
from ..tokens import TokenRows, token_rows
from .rowbias import bias_keys, lora_biases
from .strategies import AdapterSource, Assignment, layer_views


@dataclass(slots=True)
class _EmbedSegment:
    rows: torch.Tensor  # (n_u,) int64 rows of the batch with this assignment
    A: torch.Tensor  # (R, vocab)  the virtual adapter's A (cat along r for a mix)
    Bt: torch.Tensor  # (R, dim)   its B.T (for a mix: cat_k(c_k B_k).T)
    alpha: float  # w * scale for a single slot; 1.0 for a mix


@dataclass(slots=True)
class EmbeddingLayer:
    """One embedding layer of a plan: per distinct assignment, y[rows] += alpha * A.T[ids[rows]] @ Bt."""

    segments: tuple[_EmbedSegment, ...]
    compute: torch.dtype  # the plan's lora_compute_dtype

    def apply_(self, ids: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """ids (B, L), y (B, L, dim) the base embedding of ids: adds each row's embedding LoRA in place."""
        if ids.dim() != 2 or y.dim() != 3 or y.shape[:2] != ids.shape:
            raise ShapeMismatchError(f"embedding rows: expected ids (B, L) and y (B, L, dim), got ids "
                                     f"{tuple(ids.shape)} and y {tuple(y.shape)}")
        for seg in self.segments:
            h = seg.A.T[ids.index_select(0, seg.rows)].to(self.compute)  # (n_u, L, R): the A columns of each token
            y.index_add_(0, seg.rows, (h @ seg.Bt.to(self.compute)).to(y.dtype), alpha=seg.alpha)  # (n_u, L, dim)
        return y


def embedding_layers(get: AdapterSource, rows: Sequence[Assignment], layers: Mapping[str, tuple[int, int]], *,
                     dtype: torch.dtype, compute: torch.dtype, device: torch.device) -> dict[str, EmbeddingLayer]:
    """{key: EmbeddingLayer} for the embedding `layers` {key: (vocab, dim)} where some row's adapters have LoRA."""
    distinct = list(dict.fromkeys(a for a in rows if a))
    if not distinct or not layers:
        return {}
    index = {a: torch.tensor([b for b, r in enumerate(rows) if r == a], dtype=torch.long, device=device)
             for a in distinct}
    views = {a: layer_views(get, a, layers, dtype=dtype, device=device) for a in distinct}  # no memo: see pool
    out = {}
    for key in layers:
        segs = tuple(_EmbedSegment(index[a], v.A, v.Bt, v.alpha) for a in distinct if (v := views[a][key]) is not None)
        if segs:
            out[key] = EmbeddingLayer(segs, compute)
    return out


def token_tensors(rows: TokenRows, embedding: torch.Tensor, head: tuple[str, torch.Tensor] | None
                  ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """An adapter's trainable tokens as exact rank-n LoRA factors for the pool, {key: (A, B)} (scale 1.0):
    rows.module (the input embedding): (onehot(I) (n, vocab), (V - E[I]).T (dim, n)); with `head` (the module name
    and weight (vocab, dim) of the output head tied to it): (V - W[I] (n, dim), onehot(I).T (vocab, n)).
    Differences are taken in float32 (or wider) from the BARE base weights."""
    vocab, dim = embedding.shape
    if rows.values.shape[1] != dim or int(rows.indices.max()) >= vocab:
        raise ShapeMismatchError(f"trainable tokens of {rows.module!r}: {tuple(rows.values.shape)} rows for ids up "
                                 f"to {int(rows.indices.max())} do not fit an embedding ({vocab}, {dim})")
    compute = torch.promote_types(rows.values.dtype, torch.float32)
    onehot = torch.zeros(len(rows.indices), vocab, dtype=compute)
    onehot[torch.arange(len(rows.indices)), rows.indices] = 1.0  # (n, vocab)
    new = rows.values.to(compute)  # (n, dim)
    out = {rows.module: (onehot, (new - embedding.detach().to("cpu", compute)[rows.indices]).T)}
    if head is not None:
        out[head[0]] = (new - head[1].detach().to("cpu", compute)[rows.indices], onehot.T)
    return out


def tied_head(model: nn.Module) -> tuple[str, torch.Tensor] | None:
    """(module name, weight) of the output head when PEFT would tie trainable tokens to it (config.
    tie_word_embeddings and the head's weight IS the input embedding's), else None."""
    cfg = getattr(model, "config", None)
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if get_out is not None else None
    if not getattr(cfg, "tie_word_embeddings", False) or head is None:
        return None
    name = next(n for n, m in model.named_modules() if m is head)
    head = _bare(head)
    return (name, head.weight) if head.weight is _bare(model.get_input_embeddings()).weight else None


def _bare(module: nn.Module) -> nn.Module:
    """The module a runtime wrapper holds (RuntimeLinear / RuntimeEmbedding: base_layer; RuntimeModulesToSave:
    original_module), else `module` itself."""
    return getattr(module, "base_layer", getattr(module, "original_module", module))


def is_base_copy(model: nn.Module, af, key: str) -> bool:
    """Whether file key `key` of adapter file `af` is a copy of `model`'s unchanged weight of that module (PEFT
    saves `<embedding>.base_layer.weight` beside embedding LoRA); the runtime's wrappers are looked through."""
    if not key.endswith(".base_layer.weight"):
        return False
    module = key[: -len(".base_layer.weight")]
    if module not in dict(model.named_modules()):
        return False
    w = getattr(_bare(model.get_submodule(module)), "weight", None)
    t = af.tensors[key]
    return (isinstance(w, torch.Tensor) and tuple(w.shape) == tuple(t.shape)
            and torch.allclose(w.detach().float().cpu(), t.float(), atol=1e-6, rtol=1e-5))


def served_tensors(af, model: nn.Module | None, modules: Mapping[str, LoraModule]) -> tuple[
        dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, float], dict[str, torch.Tensor], list[str]]:
    """({key: (A, B)}, {key: scale}, {key: LoRA-B bias b (out,)}, rest) of adapter file `af` over base `model`: its
    LoRA factors (`modules`, from store.lora_modules), its trainable tokens as exact LoRA (`token_tensors`) and
    its lora_B biases (runtime.rowbias); rest: the file keys none of these nor a copy of an unchanged base weight
    was read from (modules_to_save copies or unknown tensors: `saved_modules.saved_copies` reads or refuses them).
    Refused (UnsupportedFeatureError): convolution factors, DoRA on an embedding, and LoRA on an output head that
    trainable tokens are tied to. model=None: no base to fit trainable tokens to (ConfigError if the file has
    some) or to compare copies with."""
    what, tokens = f"adapter {str(af.path)!r}", token_rows(af)
    if tokens is not None and model is None:
        raise ConfigError(f"{what} has trainable tokens: serving them needs the base model")
    bad = [x.keys[0] for x in modules.values() if x.a.dim() != 2 or (x.embedding and x.magnitude is not None)]
    if bad:
        raise UnsupportedFeatureError(f"{what} holds {bad[0]!r}: the runtime serves LoRA of linear and embedding "
                                      "layers (no convolutions, no DoRA on an embedding)")
    bias = lora_biases(af, modules)
    read = {*bias_keys(bias), *([tokens.key] if tokens is not None else [])}
    rest = [k for k in unread_keys(af, modules)
            if k not in read and not (model is not None and is_base_copy(model, af, k))]
    tensors = {k: (x.a, x.b) for k, x in modules.items()}
    scales = {k: x.scale for k, x in modules.items()}
    if tokens is not None:
        embed = _bare(model.get_submodule(tokens.module)) if tokens.module in dict(model.named_modules()) else None
        if not isinstance(embed, nn.Embedding):
            raise TargetNotFoundError(f"{what} has trainable tokens for {tokens.module!r}, which is no nn.Embedding "
                                      "of this base")
        rows = token_tensors(tokens, embed.weight, tied_head(model))
        both = sorted(set(rows) & set(tensors))
        if both:
            raise UnsupportedFeatureError(f"{what} has LoRA on {both[0]!r} and trainable tokens tied to it (PEFT adds "
                                          "both there); the runtime serves one set of factors per module and slot: "
                                          "serve it with its own PEFT model")
        tensors.update(rows)
        scales.update({k: 1.0 for k in rows})
    return tensors, scales, bias, rest


class RuntimeEmbedding(nn.Module):
    """y = base_layer(ids), then each row's embedding LoRA (and trainable tokens) from the engine's plan."""

    def __init__(self, base_layer: nn.Embedding, key: str, current) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.key = key
        self._current = current  # the engine's CurrentPlan; a plain attribute, not a submodule

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(ids)  # (B, L, dim)
        plan = self._current.plan
        if plan is not None and (lay := plan.embeddings.get(self.key)) is not None:
            lay.apply_(ids, y)
        return y

    @property
    def weight(self) -> torch.Tensor:  # transformers reads embed_tokens.weight (dtype, tying)
        return self.base_layer.weight

    def extra_repr(self) -> str:
        return f"key={self.key!r}"
