"""The two forward paths under `generate`, one interface: `first()` -> logits (B, V) of each prompt's last token,
then `next(tokens (B,))` -> logits (B, V) of the token each row just got. Sampling and stopping stay in generate.

  "decoder"  the compact decoder (`MultiLoraModel.compact_decoder()`, what the server runs): prompts
             right-padded into KV lanes 0..B-1, one `decode` per step; LoRA rows through the batch's plan.
  "hf"       the Hugging Face model with its RuntimeLinear wrappers and a DynamicCache: prompts left-padded
             (`left_pad`), position_ids counting real tokens only.
Both compute each row as it would alone (padding never reaches a real token). `backend="auto"` (generate's
default) takes "decoder" when the base and the request allow it, else "hf"; `backend="decoder"` refuses
(UnsupportedFeatureError, saying why) what the decoder cannot run: a base that is not a Llama-family causal LM
of plain nn.Linear projections (GPT-2, a quantized base), an adapter merged into the base, a row's adapter on a
module the decoder does not serve per row (LoRA beyond the seven projections of each layer, the output head and
the input embedding; a modules_to_save copy of anything but lm_head and the RMS norms), or prompt + new tokens
past the decoder's positions (max_position_embeddings, or the sliding window).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Optional, Protocol

import torch

from ..errors import ConfigError, UnsupportedFeatureError
from .decoder import CompactLlama, saved_places

if TYPE_CHECKING:
    from .batch import Batch
    from .model import MultiLoraModel

BACKENDS = ("auto", "decoder", "hf")


class Steps(Protocol):
    def first(self) -> torch.Tensor: ...

    def next(self, tokens: torch.Tensor) -> torch.Tensor: ...


class HFSteps:
    """generate's forwards on the wrapped Hugging Face model (see the module docstring)."""

    def __init__(self, batch: Batch, ids: torch.Tensor, mask: torch.Tensor, model: Any) -> None:
        from transformers import DynamicCache

        self.batch, self.ids, self.mask = batch, ids, mask  # (B, T) left-padded, (B, T) 1 = real
        self.pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T) positions of real tokens from 0
        self.cache = DynamicCache(config=getattr(model, "config", None))

    def first(self) -> torch.Tensor:
        return self.batch(input_ids=self.ids, attention_mask=self.mask, position_ids=self.pos,
                          past_key_values=self.cache, use_cache=True, logits_to_keep=1).logits[:, -1]  # (B, V)

    def next(self, tokens: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)  # (B, T + step)
        self.pos = self.pos[:, -1:] + 1  # (B, 1)
        return self.batch(input_ids=tokens.unsqueeze(1), attention_mask=self.mask, position_ids=self.pos,
                          past_key_values=self.cache, use_cache=True).logits[:, -1]


class DecoderSteps:
    """generate's forwards on the compact decoder (see the module docstring); each under the engine's lock."""

    def __init__(self, batch: Batch, decoder: CompactLlama, seqs: Sequence[Sequence[int]], pad: int,
                 max_new_tokens: int) -> None:
        self.batch, self.decoder = batch, decoder
        self.lengths = torch.tensor([len(s) for s in seqs])  # (B,)
        T = int(self.lengths.max())
        self.ids = torch.full((len(seqs), T), pad, dtype=torch.long)  # (B, T) right-padded
        for b, s in enumerate(seqs):
            self.ids[b, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        self.cache = decoder.new_cache(max_lanes=len(seqs), max_len=T + max_new_tokens - 1)
        self.step = 0

    def first(self) -> torch.Tensor:
        ids, lanes = self.ids.to(self.decoder.device), list(range(len(self.lengths)))
        return self.batch.run(lambda plan: self.decoder.prefill(ids, self.lengths, self.cache, lanes, plan))

    def next(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = self.lengths + self.step  # (B,) row b's new token follows its prompt and `step` tokens
        self.step += 1
        return self.batch.run(lambda plan: self.decoder.decode(tokens, positions, self.cache, plan))


def pick_decoder(engine: MultiLoraModel, backend: str, longest: int, max_new_tokens: int) -> Optional[CompactLlama]:
    """The compact decoder if `backend` ("auto" | "decoder" | "hf") runs this request on it, else None (before
    the batch opens: building the decoder registers its layers with the pool, which the plan must cover)."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "hf":
        return None
    try:
        decoder = engine.compact_decoder()
    except UnsupportedFeatureError as e:
        return _refuse(backend, str(e))
    need = longest + max_new_tokens - 1
    if need > decoder.max_positions:
        return _refuse(backend, f"the longest prompt ({longest} tokens) plus max_new_tokens - 1 needs {need} "
                                f"positions; the compact decoder holds {decoder.max_positions}")
    return decoder


def check_plan(batch: Batch, decoder: Optional[CompactLlama], backend: str) -> Optional[CompactLlama]:
    """`decoder` (from `pick_decoder`) if it applies every layer of the open batch's plan; None (then "hf") or
    UnsupportedFeatureError for backend="decoder" when a row's adapters reach another layer."""
    if decoder is None or batch.plan is None:
        return decoder
    plan, own, places = batch.plan, decoder.layer_shapes(), saved_places(decoder)
    other = sorted(k for k, lay in plan.layers.items() if lay is not None and k not in own)
    other += sorted(k for k in plan.embeddings if k not in decoder.embedding_shapes())
    other += sorted(k for k in plan.saved if k not in places)
    if other:
        return _refuse(backend, f"the batch's adapters reach {other[:3]}, outside what the compact decoder serves "
                                "per row (LoRA of the seven projections of each layer, the output head and the input "
                                "embedding; modules_to_save copies of lm_head and the RMS norms)")
    return decoder


def _refuse(backend: str, reason: str) -> None:
    """None (fall back to "hf") for backend "auto"; UnsupportedFeatureError for "decoder"."""
    if backend == "decoder":
        raise UnsupportedFeatureError(f"backend='decoder': {reason}; use backend='hf' (or 'auto')")
    return None
