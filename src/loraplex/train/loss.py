"""The training loss, per row: summed next-token cross-entropy over each row's target tokens.

The loss never builds the full (B, T, vocab) logits: for the model types in FAST_LOSS_TYPES it runs the
decoder, keeps the hidden states of target positions and applies the output head to those only, as
(W @ x.T).T (`row_losses`, `head_logits`; `row_losses_reference` is the plain full-logits version it is
tested against). `concat_batches` stacks several adapters' micro-batches into one batch of rows.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import IGNORE_INDEX

FAST_LOSS_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gpt2", "olmo2", "phi3", "smollm3"})


def target_count(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry a loss: labels[:, 1:] != -100 (token t+1 is predicted at position t)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def row_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy of each row: (B,) fp32. The output head runs on target positions only."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if getattr(getattr(model, "config", None), "model_type", None) not in FAST_LOSS_TYPES or head is None:
        return row_losses_reference(model, batch)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = model.get_decoder()(**inputs, use_cache=False).last_hidden_state  # (B, T, H)
    labels = batch["labels"][:, 1:]  # (B, T-1)
    mask = labels != IGNORE_INDEX
    logits = head_logits(head, hidden[:, :-1][mask])  # (N, V): only the N target positions
    ce = F.cross_entropy(logits.float(), labels[mask], reduction="none")  # (N,)
    rows = mask.nonzero()[:, 0]  # (N,) row of each target, in the same row-major order as the mask
    return torch.zeros(labels.shape[0], dtype=ce.dtype, device=ce.device).index_add(0, rows, ce)


def head_logits(head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """head(x) for target rows x: (N, H) -> (N, V). A plain nn.Linear head runs as (W @ x.T).T (a view): with
    few rows and a large vocabulary BLAS runs that layout faster than x @ W.T on CPU (SmolLM2's head + loss,
    forward and backward: 1.1-1.2x, bench/bench_lora_ops.py); any other head (LoRA, hooked) is called."""
    if type(head) is not nn.Linear or head._forward_hooks or head._forward_pre_hooks:
        return head(x)
    logits = torch.mm(head.weight, x.t()).t()  # (V, N) -> (N, V)
    return logits if head.bias is None else logits + head.bias


def row_losses_reference(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The obvious version of `row_losses`: full logits (B, T, V), then masked cross-entropy per row."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits  # (B, T, V)
    ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), batch["labels"][:, 1:], reduction="none",
                         ignore_index=IGNORE_INDEX)  # (B, T-1), 0 where ignored
    return ce.sum(1)


def concat_batches(parts: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Stack batches along rows, right-padding shorter ones (pad_id / attention 0 / label -100)."""
    if len(parts) == 1:
        return parts[0]
    width = max(p["input_ids"].shape[1] for p in parts)
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE_INDEX, "position_ids": 0}
    return {k: torch.cat([F.pad(p[k], (0, width - p[k].shape[1]), value=fill[k]) for p in parts]) for k in parts[0]}
