"""Answering one completion or chat request: submit its rows to the engine, then write the OpenAI answer.

A request becomes len(prompts) x len(params) engine rows (n copies, best_of candidates); they are submitted
all or none. Not streamed: one JSON body once every row is done (best_of keeps the n of highest cumulative
logprob). Streamed: server-sent events, every choice's chunks interleaved, each finish chunk, the usage chunk
if asked, then "data: [DONE]". A client that disconnects cancels its rows (streamed: at the next chunk; not
streamed: within DISCONNECT_POLL_S). The routes that call this are serve/app.py's.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections import deque
from typing import TYPE_CHECKING

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from ..errors import RequestTooLargeError
from . import errors
from .protocol import ChatBody, CompletionBody, chat_logprobs, completion_logprobs, usage
from .requests import Handle, Result, SamplingParams

if TYPE_CHECKING:
    from .app import Server

DISCONNECT_POLL_S = 0.25  # how often a waiting non-streamed request checks that its client is still there


def encode_all(server: Server, prompts: list) -> list[list[int]]:
    return [server.codec.encode(p, server.engine.config.max_prompt_tokens) if isinstance(p, str) else list(p)
            for p in prompts]


class Inbox:
    """Events from the engine thread into one event loop's request queues, with at most one wake-up of the loop
    pending: a decode step hands the loop one event per running request, and waking it once per event makes
    its thread compete for the cores with the engine's OpenMP threads 16 times a step (at batch 16)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._items: deque[tuple[asyncio.Queue, tuple]] = deque()
        self._lock = threading.Lock()
        self._pending = False  # a drain is scheduled and has not started yet

    def put(self, queue: asyncio.Queue, item: tuple) -> None:
        """Called on the engine thread: `item` goes into `queue` at the loop's next drain (order kept)."""
        with self._lock:
            self._items.append((queue, item))
            if self._pending:
                return
            self._pending = True
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the event loop is closed: nobody reads these events any more
            pass

    def _drain(self) -> None:
        with self._lock:
            items, self._items = self._items, deque()
            self._pending = False
        for queue, item in items:
            queue.put_nowait(item)


def _inbox(server: Server) -> Inbox:
    """The server's inbox for the running event loop (a new one if the loop changed)."""
    loop = asyncio.get_running_loop()
    if server.inbox is None or server.inbox.loop is not loop:
        server.inbox = Inbox(loop)
    return server.inbox


def _submit_all(server: Server, prompts: list[list[int]], model: str, params: list[SamplingParams], *,
                stream: bool) -> tuple[list[Handle], asyncio.Queue]:
    """Submit len(params) rows per prompt (row k = prompt k // len(params), copy k % len(params)); the queue
    gets (k, event) for each of their events (not streamed: only the "done" ones). All or none: a refused row
    cancels the ones before it."""
    if len(prompts) * len(params) > server.engine.config.max_queue:
        raise RequestTooLargeError(f"{len(prompts)} prompts x {len(params)} answers = {len(prompts) * len(params)} "
                                   f"rows; this server queues at most {server.engine.config.max_queue} (--queue-size)")
    inbox = _inbox(server)
    queue: asyncio.Queue = asyncio.Queue()

    def listener(k: int):
        def put(event) -> None:  # called on the engine thread
            if stream or event[0] == "done":
                inbox.put(queue, (k, event))
        return put

    handles: list[Handle] = []
    try:
        for ids in prompts:
            for p in params:
                handles.append(server.engine.submit(ids, model, p, listener=listener(len(handles))))
    except BaseException:
        for h in handles:
            h.cancel()
        raise
    return handles, queue


async def answer(server: Server, request: Request, body: CompletionBody | ChatBody, prompts: list[list[int]],
                 params: list[SamplingParams], *, chat: bool):
    """Run one request's rows; a client that disconnects before the answer cancels them (streamed: at the
    next chunk; not streamed: within DISCONNECT_POLL_S)."""
    handles, queue = _submit_all(server, prompts, body.model, params, stream=bool(body.stream))
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    if body.stream:
        return StreamingResponse(_stream(server, handles, queue, rid, created, body, prompts, chat),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    results: list[Result | None] = [None] * len(handles)
    try:
        while any(r is None for r in results):  # the client is checked after every row's end and DISCONNECT_POLL_S
            try:
                k, event = await asyncio.wait_for(queue.get(), timeout=DISCONNECT_POLL_S)
                if event[0] == "done":
                    results[k] = event[1]
                    if event[1].error is not None:
                        return errors.error_response(event[1].error)
            except asyncio.TimeoutError:
                pass
            if await request.is_disconnected():
                return Response(status_code=499)  # nobody reads it; the finally cancels the generation
    finally:
        for h in handles:
            if not h.done:
                h.cancel()
    rows, n = len(params), body.n or 1
    choices, generated = [], 0
    for i, ids in enumerate(prompts):
        group = results[i * rows:(i + 1) * rows]
        if rows > n:  # best_of: the n answers of highest cumulative logprob
            group = sorted(group, key=lambda r: -r.cumulative_logprob)[:n]
        for j, res in enumerate(group):
            generated += res.completion_tokens
            choices.append(_choice(server, body, res, ids, i * n + j, chat))
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": body.model, "choices": choices,
            "usage": usage(sum(len(ids) for ids in prompts), generated)}


def _choice(server: Server, body, res: Result, ids: list[int], index: int, chat: bool) -> dict:
    codec = server.codec
    if chat:
        return {"index": index, "message": {"role": "assistant", "content": res.text},
                "logprobs": chat_logprobs(codec, res.logprobs) if body.logprobs else None,
                "finish_reason": res.finish_reason}
    lp = None
    if body.logprobs is not None:
        lp = completion_logprobs(codec, (ids if body.echo else []) + res.token_ids[: len(res.logprobs)],
                                 (res.prompt_logprobs if body.echo else []) + res.logprobs)
    text = codec.decode(ids) + res.text if body.echo else res.text
    return {"index": index, "text": text, "finish_reason": res.finish_reason, "logprobs": lp}


async def _stream(server: Server, handles: list[Handle], queue: asyncio.Queue, rid: str, created: int, body,
                  prompts: list[list[int]], chat: bool):
    """Server-sent events: every choice's chunks interleaved (each names its index), the finish chunk of
    each, the usage chunk if asked, then [DONE]. An error in any row ends the stream with an error event."""
    obj = "chat.completion.chunk" if chat else "text_completion"
    codec, rows = server.codec, len(handles) // len(prompts)
    offsets = [0] * len(handles)  # characters streamed per choice (completions' text_offset)

    def chunk(k: int, text: str | None, finish: str | None = None, lp=None, role: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
            choice = {"index": k, "delta": delta, "logprobs": lp, "finish_reason": finish}
        else:
            choice = {"index": k, "text": text or "", "logprobs": lp, "finish_reason": finish}
            offsets[k] += len(text or "")
        return _sse({"id": rid, "object": obj, "created": created, "model": body.model, "choices": [choice]})

    try:
        if chat:
            for k in range(len(handles)):
                yield chunk(k, None, role=True)
        done, generated = 0, 0
        while done < len(handles):
            k, event = await queue.get()
            if event[0] == "prompt":  # completions with echo: the prompt first
                prompt = prompts[k // rows]
                lp = completion_logprobs(codec, prompt, event[1], offsets[k]) if body.logprobs is not None else None
                yield chunk(k, codec.decode(prompt), lp=lp)
            elif event[0] == "delta":
                text, entry = event[1], event[3]
                lp = None
                if entry is not None and chat and body.logprobs:
                    lp = chat_logprobs(codec, [entry])
                elif entry is not None and not chat and body.logprobs is not None:
                    lp = completion_logprobs(codec, [entry.token], [entry], offsets[k])
                yield chunk(k, text, lp=lp)
            else:
                res: Result = event[1]
                if res.error is not None:
                    yield _sse(errors.stream_error(res.error))
                    return
                done, generated = done + 1, generated + res.completion_tokens
                yield chunk(k, None if chat else "", res.finish_reason)
        if body.stream_options is not None and body.stream_options.include_usage:
            yield _sse({"id": rid, "object": obj, "created": created, "model": body.model, "choices": [],
                        "usage": usage(sum(len(ids) for ids in prompts), generated)})
        yield "data: [DONE]\n\n"
    finally:
        for h in handles:
            if not h.done:
                h.cancel()


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


