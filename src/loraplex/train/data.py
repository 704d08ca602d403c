"""From records to training batches: tokenize with loss masks, split, and batch (padded or packed), resumably.

Labels follow the Hugging Face convention: `labels` is aligned with `input_ids` (the model shifts by one
inside its loss) and holds IGNORE_INDEX (-100) where no loss is taken. What `tokenize` labels:

    text                              every token + EOS (a tokenizer's leading BOS is not labelled)
    prompt/completion, chat template  the assistant turn: completion tokens + end-of-turn token
    messages, chat template           every assistant turn (content + end-of-turn token)
    prompt/completion, no template    [BOS?] prompt | completion EOS   (loss right of the bar)

Worked example (SmolLM2's template, prompt "Hi", completion "Hello"; loss between the bars):
    <|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n
    | Hello<|im_end|> | \\n
the template's newline after the end-of-turn token (the tokenizer's eos) is not a target.
"""

from __future__ import annotations

import hashlib
import math
import random
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import DataError
from .sources import Record

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    input_ids: list[int]  # (T,)
    labels: list[int]  # (T,) input_ids where the loss is taken, IGNORE_INDEX elsewhere
    origin: str = field(default="", compare=False)  # the record's "file:line"

    def __post_init__(self) -> None:
        if not self.input_ids:
            raise DataError(f"{self.origin or 'Example'}: expected at least one token, got none")
        if len(self.input_ids) != len(self.labels):
            raise DataError(f"{self.origin or 'Example'}: expected labels as long as input_ids "
                            f"({len(self.input_ids)}), got {len(self.labels)}")

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_loss_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


class Examples(list):
    """A list of Example, plus what `tokenize` had to do: `truncated` were cut to max_length (keeping the
    start), `dropped` were left with no loss token after truncation and are not in the list."""

    def __init__(self, items: Iterable[Example] = (), *, truncated: int = 0, dropped: int = 0) -> None:
        super().__init__(items)
        self.truncated = truncated
        self.dropped = dropped


def tokenize(records: Iterable[Record], tokenizer: Any, *, max_length: int) -> Examples:
    """Tokenize records into Examples with loss masks (table in the module doc), truncated to max_length.

    Chat templates are rendered to text and tokenized without adding special tokens (the template has them).
    The prompt/assistant boundary is the tokenized render of the turns before it with add_generation_prompt=
    True, which must be a token prefix of the full render; if it is not (the template rewrites earlier turns,
    or tokens merge across the boundary) a DataError names the record. An assistant turn's labels stop
    after the tokenizer's eos token when the turn holds one (SmolLM2: <|im_end|>); a template whose
    end-of-turn token is not the eos gets the whole rendered turn labelled, trailing template text included.
    """
    if not isinstance(max_length, int) or max_length < 1:
        raise DataError(f"tokenize: expected max_length to be a positive int, got {max_length!r}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("tokenize: expected a tokenizer with an eos_token (it ends text and completions), got none")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    lead = _leading_special_ids(tokenizer)
    out = Examples()
    for record in records:
        if record.kind == "text":
            ids = lead + _encode(tokenizer, record.text) + [eos]
            labels = [IGNORE_INDEX] * len(lead) + ids[len(lead):]
        elif has_template:
            ids, labels = _encode_chat(tokenizer, record)
        elif record.kind == "prompt_completion":
            prompt = lead + _encode(tokenizer, record.prompt)
            answer = _encode(tokenizer, record.completion) + [eos]
            ids, labels = prompt + answer, [IGNORE_INDEX] * len(prompt) + answer
        else:
            raise DataError(f"{record.origin or 'record'}: expected a tokenizer with a chat template for a "
                            "messages record, got tokenizer.chat_template = None; set one, or write the data "
                            "as prompt/completion records")
        if len(ids) > max_length:
            ids, labels = ids[:max_length], labels[:max_length]
            out.truncated += 1
        if all(label == IGNORE_INDEX for label in labels):
            out.dropped += 1
            continue
        out.append(Example(ids, labels, record.origin))
    return out


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _leading_special_ids(tokenizer: Any) -> list[int]:
    """The special tokens this tokenizer puts before a text (e.g. [BOS] for Llama, [] for GPT-2/SmolLM2)."""
    plain = _encode(tokenizer, "a")
    full = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start]
    return []


def _encode_chat(tokenizer: Any, record: Record) -> tuple[list[int], list[int]]:
    import jinja2  # a transformers dependency; only its error type is needed

    where = record.origin or "record"
    messages = record.chat()

    def render(turns: list[dict[str, str]], generation_prompt: bool) -> list[int]:
        try:
            text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)
        except jinja2.TemplateError as e:
            raise DataError(f"{where}: the chat template failed on {len(turns)} turns: {e}") from None
        return _encode(tokenizer, text)

    ids = render(messages, False)
    labels = [IGNORE_INDEX] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:i], True)  # everything up to the assistant's first content token
        through = ids if i == len(messages) - 1 else render(messages[: i + 1], False)
        checks = ((before, through, f"turns before assistant turn {i} (with add_generation_prompt=True)"),
                  (through, ids, f"turns up to assistant turn {i}"))
        for part, whole, what in checks:
            if whole[: len(part)] != part:
                at = next((j for j, (a, b) in enumerate(zip(part, whole)) if a != b), len(whole))
                raise DataError(
                    f"{where}: expected the chat template's render of the {what} to be a token prefix of the "
                    f"longer render, got a difference at token {at} ({tokenizer.decode(part[at:at + 8])!r} vs "
                    f"{tokenizer.decode(whole[at:at + 8])!r}); the template rewrites earlier turns or tokens "
                    "merge across the turn boundary (e.g. a reply starting with whitespace: strip it)")
        end = len(through)
        turn = through[len(before):end]
        if tokenizer.eos_token_id in turn:  # stop after the end-of-turn token, not at the template's newline
            end = len(before) + len(turn) - turn[::-1].index(tokenizer.eos_token_id)
        labels[len(before):end] = ids[len(before):end]
    return ids, labels


def split(examples: Sequence[Example], eval_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, eval), the same for the same inputs. Identical examples are grouped first, so one never sits on
    both sides (chatterbot's tech_support repeats 10 distinct pairs 1050 times); round(groups * eval_fraction)
    groups drawn with `seed` go to eval (at least 1 when the fraction is > 0 and there are >= 2 groups, and
    never all). Both sides keep the input order."""
    if not 0.0 <= eval_fraction < 1.0:
        raise DataError(f"split: expected 0 <= eval_fraction < 1, got {eval_fraction!r}")
    groups: dict[tuple[tuple[int, ...], tuple[int, ...]], list[int]] = {}
    for i, e in enumerate(examples):
        groups.setdefault((tuple(e.input_ids), tuple(e.labels)), []).append(i)
    members = list(groups.values())  # in first-seen order
    g = len(members)
    n_eval = min(max(round(g * eval_fraction), 1), g - 1) if eval_fraction > 0 and g >= 2 else 0
    picked = random.Random(f"loraplex-split:{seed}").sample(range(g), n_eval)
    chosen = {i for k in picked for i in members[k]}
    train = [e for i, e in enumerate(examples) if i not in chosen]
    held = [e for i, e in enumerate(examples) if i in chosen]
    return train, held


class Batcher:
    """Batches of examples as torch tensors, epoch after epoch, in an order fixed by (seed, epoch).

    Padding (packing=False): each batch holds `batch_size` examples padded on the right to the longest:
        input_ids (B, T) pad_id on pads · attention_mask (B, T) 0 on pads · labels (B, T) -100 on pads
    Packing (packing=True): the epoch's examples are concatenated in order and cut into rows of exactly
    `max_length` tokens (an example may continue into the next row; the last row is padded):
        input_ids (B, max_length) · labels (B, max_length) · position_ids (B, max_length)
    position_ids restart at 0 where each example (or its continuation in a new row) starts, and the label
    of that first token is -100, so no token is ever a target predicted from another example.
    Packed batches carry NO attention_mask on purpose: call `model(**batch, use_cache=False)`. Given
    position_ids, no attention_mask and no cache, transformers' mask builder (Llama family and the other
    decoders that use `create_causal_mask`; eager, sdpa, flash) makes attention block-diagonal per example,
    so a packed row computes exactly what its examples compute alone (tested). Not isolated: with an
    attention_mask, with use_cache left True (a cache disables the detection), or on a model that does
    not build its mask from position_ids, tokens attend to earlier examples in their row; positions and
    targets stay per-example. Pads sit at the row end, after every real token, so causal attention never
    lets a real token see them.

    Iterating yields the rest of the current epoch, then the state moves to the next epoch. Resume with
    `state_dict()` / `load_state_dict()`; a training loop reads:
        while batcher.epoch < epochs:
            for batch in batcher: ...
    """

    def __init__(self, examples: Sequence[Example], batch_size: int, *, seed: int, shuffle: bool = True,
                 packing: bool = False, max_length: int | None = None, pad_id: int) -> None:
        if not examples:
            raise DataError("Batcher: expected at least one example, got none")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise DataError(f"Batcher: expected batch_size to be a positive int, got {batch_size!r}")
        if packing and (not isinstance(max_length, int) or max_length < 1):
            raise DataError(f"Batcher: packing needs max_length (a positive int, the row length), got {max_length!r}")
        if not isinstance(pad_id, int):
            raise DataError(f"Batcher: expected pad_id to be an int (the tokenizer's pad_token_id), got {pad_id!r}")
        if not packing and max_length is not None:
            longest = max(len(e) for e in examples)
            if longest > max_length:
                raise DataError(f"Batcher: expected examples of at most max_length={max_length} tokens, got "
                                f"one of {longest}; tokenize(..., max_length=...) truncates them")
        self.examples = list(examples)
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.packing, self.max_length, self.pad_id = packing, max_length, pad_id
        total = sum(len(e) for e in self.examples)
        self._rows_per_epoch = math.ceil(total / max_length) if packing else len(self.examples)
        self._epoch, self._position = 0, 0  # position: batches of this epoch already yielded
        self._digest: str | None = None  # fingerprint, computed on first use

    def __len__(self) -> int:
        """Batches per epoch."""
        return math.ceil(self._rows_per_epoch / self.batch_size)

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def position(self) -> int:
        return self._position

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        epoch, rows, n = self._epoch, self._rows(self._epoch), len(self)
        for k in range(self._position, n):
            batch = self._collate(rows[k * self.batch_size:(k + 1) * self.batch_size])
            # the state moves before the yield, so a checkpoint taken while this batch trains resumes after it
            self._epoch, self._position = (epoch + 1, 0) if k + 1 == n else (epoch, k + 1)
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready: where the iteration stands, and a fingerprint of the data and settings it belongs to."""
        return {"epoch": self._epoch, "position": self._position, "fingerprint": self._fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("fingerprint") != self._fingerprint():
            raise DataError("Batcher.load_state_dict: expected a state saved with the same examples, seed and "
                            f"batching settings ({self._fingerprint()}), got {state.get('fingerprint')}")
        epoch, position = state["epoch"], state["position"]
        if not (isinstance(epoch, int) and epoch >= 0 and isinstance(position, int) and 0 <= position < len(self)):
            raise DataError(f"Batcher.load_state_dict: expected epoch >= 0 and 0 <= position < {len(self)}, got "
                            f"epoch={epoch!r}, position={position!r}")
        self._epoch, self._position = epoch, position

    def _fingerprint(self) -> str:
        if self._digest is not None:
            return self._digest
        digest = hashlib.blake2b(digest_size=16)
        for e in self.examples:
            digest.update(array("q", [len(e)]).tobytes() + array("q", e.input_ids).tobytes()
                          + array("q", e.labels).tobytes())
        settings = (self.batch_size, self.seed, self.shuffle, self.packing, self.max_length, self.pad_id)
        digest.update(repr(settings).encode())
        self._digest = digest.hexdigest()
        return self._digest

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.examples)))
        if self.shuffle:  # a str seed hashes the same in every process (unlike hash())
            random.Random(f"loraplex-batcher:{self.seed}:{epoch}").shuffle(order)
        return order

    def _rows(self, epoch: int) -> list[tuple[list[int], list[int], list[int]]]:
        """The epoch's rows as (input_ids, labels, position_ids); padding mode: one example per row."""
        order = self._order(epoch)
        if not self.packing:
            return [(self.examples[i].input_ids, self.examples[i].labels, []) for i in order]
        width = self.max_length
        rows: list[tuple[list[int], list[int], list[int]]] = []
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for i in order:
            e, start = self.examples[i], 0
            while start < len(e):
                take = min(width - len(ids), len(e) - start)
                ids += e.input_ids[start:start + take]
                labels += [IGNORE_INDEX] + e.labels[start + 1:start + take]  # no target across examples
                positions += range(take)
                start += take
                if len(ids) == width:
                    rows.append((ids, labels, positions))
                    ids, labels, positions = [], [], []
        if ids:  # the last row: pads form their own segment (positions restart), never a target
            pad = width - len(ids)
            rows.append((ids + [self.pad_id] * pad, labels + [IGNORE_INDEX] * pad, positions + list(range(pad))))
        return rows

    def _collate(self, rows: list[tuple[list[int], list[int], list[int]]]) -> dict[str, torch.Tensor]:
        if self.packing:
            return {"input_ids": torch.tensor([r[0] for r in rows], dtype=torch.long),
                    "labels": torch.tensor([r[1] for r in rows], dtype=torch.long),
                    "position_ids": torch.tensor([r[2] for r in rows], dtype=torch.long)}
        width = max(len(r[0]) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)  # (B, T)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
        for b, (ids, labs, _) in enumerate(rows):
            input_ids[b, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            labels[b, :len(ids)] = torch.tensor(labs, dtype=torch.long)
            attention_mask[b, :len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
