"""Text in and out of the serving engine: tokenizers, chat prompts, incremental decoding, stop strings.

`TextCodec` wraps either a transformers tokenizer or, for bases shipped without one (the tiny test models),
`ByteTokenizer`: token id = the UTF-8 byte value (so it needs a vocabulary of at least 128 for ASCII).

Text that is not valid Unicode (a lone surrogate such as "\ud800", which JSON can carry) is refused with
ConfigError. With `max_tokens`, text whose UTF-8 size could not fit is refused (RequestTooLargeError) before
it is tokenized: no token covers more than `max_token_bytes` bytes, so text of more than
SIZE_MARGIN * max_tokens * max_token_bytes bytes is surely too long (the margin covers normalizers that
shrink text); the exact limit is `check_prompt`'s, on the ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

from ..errors import ConfigError, RequestTooLargeError
from ..runtime.generate import stop_ids


class ByteTokenizer:
    """ids are UTF-8 bytes; ids listed in `special` (bos/eos/pad) never appear in decoded text."""

    def __init__(self, vocab_size: int, special: Sequence[int] = ()) -> None:
        self.vocab_size = vocab_size
        self.special = frozenset(special)

    def encode(self, text: str) -> list[int]:
        ids = list(text.encode("utf-8"))
        bad = sorted({i for i in ids if i >= self.vocab_size or i in self.special})
        if bad:
            raise ConfigError(f"this base has no tokenizer and a {self.vocab_size}-id byte vocabulary with "
                              f"special ids {sorted(self.special)}; the text holds bytes {bad[:5]} it cannot "
                              "encode (send token ids instead, or plain ASCII)")
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256 and i not in self.special).decode("utf-8", errors="replace")


@dataclass
class TextCodec:
    """Encode prompts, render chats and decode ids for one base."""

    tokenizer: object  # a transformers tokenizer, or a ByteTokenizer
    eos_ids: frozenset[int]

    @cached_property
    def max_token_bytes(self) -> int:
        """An upper bound of the UTF-8 bytes one token stands for (its vocabulary string's length in bytes)."""
        if isinstance(self.tokenizer, ByteTokenizer):
            return 1
        return max(len(t.encode("utf-8", "backslashreplace")) for t in self.tokenizer.get_vocab())

    def check_size(self, texts: Sequence[str], max_tokens: int | None) -> None:
        """Refuse text that is not valid Unicode, or surely longer than `max_tokens` (see the module docstring)."""
        size = sum(len(utf8(t)) for t in texts)
        if max_tokens is not None and size > SIZE_MARGIN * max_tokens * self.max_token_bytes:
            raise RequestTooLargeError(f"the prompt is {size} bytes of text, far more than {max_tokens} tokens "
                                       "(--max-prompt-tokens); shorten it")

    @classmethod
    def for_model(cls, tokenizer: object | None, model: object) -> TextCodec:
        """The codec of `model` (a transformers model, or its config): it stops on `runtime.generate.stop_ids`;
        without a tokenizer it uses a ByteTokenizer whose special ids are the config's bos/eos/pad and those."""
        config = getattr(model, "config", model)
        eos_ids = stop_ids(model, tokenizer)
        if tokenizer is None:
            special = {getattr(config, n, None) for n in ("bos_token_id", "eos_token_id", "pad_token_id")}
            special |= set(eos_ids)
            tokenizer = ByteTokenizer(config.vocab_size, [s for s in special if isinstance(s, int)])
        return cls(tokenizer, eos_ids)

    def encode(self, text: str, max_tokens: int | None = None, *, special: bool = True) -> list[int]:
        """Token ids of `text`; special=False leaves out the tokens the tokenizer adds (bos...)."""
        self.check_size([text], max_tokens)
        if isinstance(self.tokenizer, ByteTokenizer):
            return self.tokenizer.encode(text)
        return list(self.tokenizer.encode(text, add_special_tokens=special))

    def token_text(self, token: int) -> str:
        """One token's text, special tokens included (a byte that is part of a UTF-8 character: "\ufffd")."""
        if isinstance(self.tokenizer, ByteTokenizer):
            return bytes([token]).decode("utf-8", errors="replace") if token < 256 else ""
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def token_bytes(self, token: int) -> list[int]:
        """One token's bytes: the raw byte for the byte vocabulary; the bytes a byte-level BPE token stands for
        (a piece of a UTF-8 character included); else the UTF-8 of `token_text`."""
        if isinstance(self.tokenizer, ByteTokenizer):
            return [token] if token < 256 else []
        piece = self.tokenizer.convert_ids_to_tokens(token)
        if self._byte_level and token not in self.tokenizer.all_special_ids and all(c in _UNBYTE for c in piece):
            return [_UNBYTE[c] for c in piece]
        return list(self.token_text(token).encode("utf-8", "surrogatepass"))

    @cached_property
    def _byte_level(self) -> bool:
        """Whether the tokenizer's decoder is GPT-2's ByteLevel (each vocabulary character stands for a byte)."""
        decoder = getattr(getattr(self.tokenizer, "backend_tokenizer", None), "decoder", None)
        return type(decoder).__name__ == "ByteLevel"

    def decode(self, ids: Sequence[int]) -> str:
        if isinstance(self.tokenizer, ByteTokenizer):
            return self.tokenizer.decode(ids)
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def chat(self, messages: Sequence[dict], max_tokens: int | None = None) -> list[int]:
        """Token ids of a chat ending in an open assistant turn (the tokenizer's chat template if it has one;
        else the plain template `<|role|>\\ncontent\\n` ... `<|assistant|>\\n`)."""
        self.check_size([m["content"] for m in messages], max_tokens)
        if not isinstance(self.tokenizer, ByteTokenizer) and getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"
        return self.encode(text)


SIZE_MARGIN = 4


def _gpt2_unbyte() -> dict[str, int]:
    """GPT-2's byte-level alphabet reversed: vocabulary character -> the byte it stands for (printable bytes
    stand for themselves, the other 68 are shifted to chr(256 + k))."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in keep]
    return {**{chr(b): b for b in keep}, **{chr(256 + k): b for k, b in enumerate(shifted)}}


_UNBYTE = _gpt2_unbyte()


def utf8(text: str) -> bytes:
    """`text` as UTF-8; ConfigError (not UnicodeEncodeError) for text holding a lone surrogate."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ConfigError(f"the text is not valid Unicode: it holds the lone surrogate {text[exc.start]!r} at "
                          f"character {exc.start}; send UTF-8 text") from None


def check_prompt(ids: Sequence[int], *, vocab: int, max_prompt_tokens: int) -> list[int]:
    """Validate prompt token ids: non-empty, in the vocabulary, at most `max_prompt_tokens` (else 413)."""
    ids = list(ids)
    if not ids:
        raise ConfigError("the prompt is empty; send at least one token")
    if len(ids) > max_prompt_tokens:
        raise RequestTooLargeError(f"the prompt has {len(ids)} tokens; this server takes at most "
                                   f"{max_prompt_tokens} (--max-prompt-tokens); shorten it")
    bad = [i for i in ids if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < vocab]
    if bad:
        raise ConfigError(f"prompt token ids must be integers in [0, {vocab}); got {bad[:5]}")
    return ids


PROMPT_CONTEXT = 5  # prompt tokens the first decode window starts with (as vLLM)


@dataclass
class Detokenizer:
    """Turns generated ids into text deltas incrementally, cutting at the first stop string.

    Offset-based, as vLLM and TGI: `push(id)` decodes only a short window of ids, ids[prefix:] against
    ids[prefix:read], and the new text is the difference. The first window starts with the prompt's last
    PROMPT_CONTEXT tokens, so the first generated token keeps a leading space that SentencePiece-style
    decoders drop at the start of a text. A window whose text ends in an incomplete UTF-8 character
    ("\ufffd") grows until the character is complete (`flush` at the end gives whatever is left), so a
    character split across tokens is never garbled and never repeated. Text that could be the beginning of a
    stop string is held back until the next token.
    """

    codec: TextCodec
    stop: tuple[str, ...] = ()
    prompt: Sequence[int] = ()
    ids: list[int] = field(default_factory=list)  # the prompt's last tokens, then the generated ones
    prefix: int = 0  # ids[prefix:read] decode to text already in `text` (the window's context)
    read: int = 0
    text: str = ""  # decoded generated text, cut at a stop string once one is found
    sent: int = 0  # characters of `text` already returned
    stopped: bool = False

    def __post_init__(self) -> None:
        self.ids = list(self.prompt[-PROMPT_CONTEXT:])
        self.read = len(self.ids)

    def push(self, token: int) -> str:
        self.ids.append(token)
        new = self._window()
        if new and not new.endswith("\ufffd"):
            self._add(new)
        if self.stopped:
            return self.flush()
        keep = len(self.text) - _held_for_stop(self.text, self.stop)
        delta, self.sent = self.text[self.sent: max(keep, self.sent)], max(keep, self.sent)
        return delta

    def flush(self) -> str:
        """Everything not yet returned (at the end of generation), an incomplete last character included."""
        if not self.stopped and self.read < len(self.ids):
            self._add(self._window())
        delta, self.sent = self.text[self.sent:], len(self.text)
        return delta

    def _window(self) -> str:
        """The text ids[read:] add after ids[prefix:read] ('' if none yet)."""
        before = self.codec.decode(self.ids[self.prefix: self.read])
        after = self.codec.decode(self.ids[self.prefix:])
        return after[len(before):] if len(after) > len(before) else ""

    def _add(self, new: str) -> None:
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0) + 1)
        self.text += new
        self.prefix, self.read = self.read, len(self.ids)
        cuts = [at for at in (self.text.find(s, start) for s in self.stop) if at >= 0]
        if cuts:
            self.text, self.stopped = self.text[: min(cuts)], True


def _held_for_stop(text: str, stop: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
