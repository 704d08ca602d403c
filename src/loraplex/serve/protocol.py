"""The OpenAI wire format: request bodies (what a request may say, checked by pydantic, turned into
SamplingParams) and the JSON of results (choices, logprobs, usage).

Unknown fields are refused (400, `param` = the field), never ignored: a client that sends `tools`,
`response_format` or `suffix` learns that this server does not honour them. Each prompt of a completions
request is run `best_of` (default `n`) times as separate rows of the same continuous batch; choice
`i * n + j` is the j-th answer to prompt i (with best_of, the n answers of highest cumulative logprob).
Copy j of a seeded request samples with seed + j (wrapped into SEED_RANGE), so copy 0 equals the n = 1 answer.

Logprobs (see runtime/logprobs.py: raw log_softmax before any sampling adjustment). Completions:
`{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`, where top_logprobs[t] maps the token strings
of the chosen token and the `logprobs` most likely ones to their logprobs (so up to logprobs + 1 entries,
as vLLM); with echo the prompt's tokens come first, the very first with null logprob and null top. Chat:
`{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}] * top_logprobs}]}`.
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from ..errors import ConfigError
from ..runtime.sampling import MAX_LOGPROBS, MAX_TEMPERATURE, SEED_RANGE, SamplingParams
from .requests import TokenLogprob
from .text import TextCodec

MAX_CHOICES = 16  # n and best_of per prompt


def refused(param: str, message: str) -> ConfigError:
    """A ConfigError about request field `param` (serve/errors.py puts it in the error's `param`)."""
    err = ConfigError(f"{param}: {message}")
    err.param = param
    return err


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Body(BaseModel):
    """The fields completions and chat share (OpenAI's names and ranges, plus vLLM's top_k, min_p,
    repetition_penalty and loraplex's ignore_eos)."""

    model_config = ConfigDict(extra="forbid")
    model: str
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float | None = Field(default=None, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: StrictInt = Field(default=0, ge=-1)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=100.0)
    logit_bias: dict[str, float] | None = None
    n: StrictInt | None = Field(default=None, ge=1, le=MAX_CHOICES)
    stream: bool | None = False
    stop: Union[str, list[str], None] = None
    seed: int | None = Field(default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    ignore_eos: bool = False
    stream_options: StreamOptions | None = None

    def sampling(self, default_max: int, *, logprobs: int | None, prompt_logprobs: int | None = None,
                 copy: int = 0) -> SamplingParams:
        """The SamplingParams of answer number `copy` (see the module docstring for seeds)."""
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        bias = []
        for k, v in (self.logit_bias or {}).items():
            if not (k.isascii() and k.lstrip("-").isdigit() and len(k) <= 12):
                raise refused("logit_bias", f"keys are token ids written as strings, like {{\"50256\": -100}}; "
                                            f"got {k!r}")
            bias.append((int(k), v))
        seed = None if self.seed is None else (self.seed + copy - SEED_RANGE[0]) % (SEED_RANGE[1] - SEED_RANGE[0] + 1) \
            + SEED_RANGE[0]
        return SamplingParams(max_tokens=default_max if self.max_tokens is None else self.max_tokens,
                              temperature=1.0 if self.temperature is None else self.temperature,
                              top_p=1.0 if self.top_p is None else self.top_p, stop=stop, seed=seed,
                              ignore_eos=self.ignore_eos, top_k=self.top_k, min_p=self.min_p,
                              frequency_penalty=self.frequency_penalty or 0.0,
                              presence_penalty=self.presence_penalty or 0.0,
                              repetition_penalty=self.repetition_penalty, logit_bias=tuple(bias),
                              logprobs=logprobs, prompt_logprobs=prompt_logprobs)


class CompletionBody(_Body):
    prompt: Union[str, list[StrictInt], list[str], list[list[StrictInt]]]
    echo: bool = False
    logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    best_of: StrictInt | None = Field(default=None, ge=1, le=MAX_CHOICES)

    def rows(self) -> int:
        """Rows run per prompt (best_of, else n)."""
        n = self.n or 1
        if self.best_of is not None and self.best_of < n:
            raise refused("best_of", f"best_of ({self.best_of}) must be >= n ({n})")
        if self.best_of not in (None, n) and self.stream:
            raise refused("best_of", "best_of > n cannot be streamed (the best answers are known only at the "
                                     "end); drop stream or best_of")
        return self.best_of or n

    def params(self, default_max: int, copy: int) -> SamplingParams:
        ranked = (self.best_of or 1) > (self.n or 1)  # the cumulative logprob is needed to rank
        lp = self.logprobs if self.logprobs is not None else (0 if ranked else None)
        return self.sampling(default_max, logprobs=lp, copy=copy,
                             prompt_logprobs=(self.logprobs or 0) if self.echo else None)

    def prompts(self) -> list[Union[str, list[int]]]:
        """The prompts: one string or id list, or a list of them (each its own row(s))."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        if not p:
            raise refused("prompt", "an empty list; send a string, token ids, or a list of those")
        return list(p)


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[_Part], None] = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(p.text for p in self.content)


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    def rows(self) -> int:
        return self.n or 1

    def params(self, default_max: int, copy: int) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise refused("top_logprobs", "top_logprobs needs logprobs: true")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise refused("max_tokens", "send max_tokens or max_completion_tokens, not both")
        if self.max_completion_tokens is not None:
            default_max = self.max_completion_tokens
        return self.sampling(default_max, logprobs=(self.top_logprobs or 0) if self.logprobs else None,
                             copy=copy)


class TokenizeBody(BaseModel):
    """vLLM's /tokenize: a `prompt` (add_special_tokens as the tokenizer does by default) or chat `messages`
    (rendered with the chat template, ending in an open assistant turn)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    return_token_strs: bool = False


class DetokenizeBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[StrictInt]


# ---- results as JSON ----------------------------------------------------------------------------------------
def completion_logprobs(codec: TextCodec, tokens: list[int], entries: list[TokenLogprob | None],
                        offset: int = 0) -> dict:
    """OpenAI completions logprobs of consecutive positions holding `tokens` (entries[j] None: a position
    without logprobs, the first prompt token); text offsets count characters from `offset`."""
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t, e in zip(tokens, entries, strict=True):
        text = codec.token_text(t)
        out["tokens"].append(text)
        out["token_logprobs"].append(None if e is None else e.logprob)
        if e is None:
            out["top_logprobs"].append(None)
        else:  # the chosen token first, so an alternative with the same text overwrites it (see the docstring)
            top = {text: e.logprob}
            top.update((codec.token_text(a), lp) for a, lp in e.top)
            out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def chat_logprobs(codec: TextCodec, entries: list[TokenLogprob]) -> dict:
    def one(t: int, lp: float) -> dict:
        return {"token": codec.token_text(t), "logprob": lp, "bytes": codec.token_bytes(t)}

    return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
                        for e in entries]}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
