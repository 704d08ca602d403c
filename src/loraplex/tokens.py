"""Trainable tokens (PEFT's `trainable_token_indices`): an adapter's own rows of the input embedding.

An adapter trained with `trainable_token_indices=[i_1, ..., i_n]` stores new embedding rows V (n, dim) for those
token ids; for them the embedding gives V_j instead of the base row E[i_j] (PEFT's TrainableTokensLayer: it
replaces, it does not add), and on a base whose output head is tied to the embedding, the head's rows i_j are
V_j too (logits of token i_j = h @ V_j). File layout (PEFT 0.21), config {"trainable_token_indices": [1, 5, 7]}
(or {"embed_tokens": [1, 5, 7]}: a module name suffix -> ids) and one tensor
    base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta     (n, dim)  the NEW rows V
PEFT refuses trainable tokens on a module that embedding LoRA targets; so does `token_rows`.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .errors import AdapterFileError, ShapeMismatchError, UnsupportedFeatureError

TOKENS_SUFFIX = ".token_adapter.trainable_tokens_delta"  # file key = <module> + TOKENS_SUFFIX (prefix stripped)
COPY_SUFFIX = ".token_adapter.base_layer.weight"  # PEFT's modules_to_save copy of a module that tokens also wrap


class TokenRows(NamedTuple):
    """One adapter's trainable tokens, as a file holds them (see `token_rows`)."""

    module: str  # the embedding module, e.g. "model.embed_tokens"
    indices: torch.Tensor  # (n,) int64 token ids, distinct
    values: torch.Tensor  # (n, dim) their new embedding rows
    key: str  # the file key (prefix stripped) they were read from


def token_rows(af) -> Optional[TokenRows]:
    """The trainable tokens of adapter file `af` (a store.AdapterFile), or None when its config sets none.

    Refuses (naming the file): a trainable_tokens_delta without the config key or the reverse, more than one
    such module, a module the config's dict does not name, rows that do not match the ids (n, dim), and
    non-floating rows (AdapterFileError / ShapeMismatchError); a modules_to_save copy under the tokens (PEFT's
    `<module>.token_adapter.base_layer.weight`, e.g. modules_to_save=["lm_head"] on a tied base), which
    nothing in loraplex serves (UnsupportedFeatureError)."""
    what, spec = f"adapter {str(af.path)!r}", af.config.trainable_token_indices
    copied = [k for k in af.tensors if k.endswith(COPY_SUFFIX)]
    if copied:
        module = copied[0][: -len(COPY_SUFFIX)]
        raise UnsupportedFeatureError(f"{what} holds {copied[0]!r}: a modules_to_save copy of {module!r} under its "
                                      "trainable tokens (PEFT trains the copy and puts the token rows on top of it); "
                                      "loraplex serves trainable tokens on the base's own module: train it without "
                                      f"{module!r} in modules_to_save")
    keys = [k for k in af.tensors if k.endswith(TOKENS_SUFFIX)]
    if spec is None:
        if keys:
            raise AdapterFileError(f"{what} holds {keys[0]!r} but its config sets no trainable_token_indices")
        return None
    if len(keys) != 1:
        raise AdapterFileError(f"{what}: its config sets trainable_token_indices={spec!r}; expected one "
                               f"'<module>{TOKENS_SUFFIX}' tensor, found {keys}")
    key = keys[0]
    module = key[: -len(TOKENS_SUFFIX)]
    if isinstance(spec, dict):
        ((name, ids),) = spec.items()  # LoraConfig allows one entry
        if not module.endswith(name):
            raise AdapterFileError(f"{what}: trainable_token_indices names {name!r}, the file's rows are for "
                                   f"{module!r}")
    else:
        ids = spec
    values = af.tensors[key]
    if not values.is_floating_point() or values.dim() != 2 or values.shape[0] != len(ids):
        raise ShapeMismatchError(f"{what}: {key!r} is {values.dtype} {tuple(values.shape)}; expected floating "
                                 f"rows ({len(ids)}, dim), one per id in trainable_token_indices")
    if f"{module}.lora_embedding_A" in af.tensors:
        raise UnsupportedFeatureError(f"{what}: {module!r} has embedding LoRA and trainable tokens; PEFT refuses "
                                      "both on one module, and so does loraplex")
    return TokenRows(module, torch.tensor(ids, dtype=torch.long), values, key)
