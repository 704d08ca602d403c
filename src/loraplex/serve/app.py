"""The HTTP API (FastAPI): OpenAI-compatible completions and chat over many adapters, plus adapter admin.

    POST   /v1/completions            {"model", "prompt", "max_tokens", "temperature", "top_p", "stop", "stream", ...}
    POST   /v1/chat/completions       {"model", "messages", ...}; "stream": true answers server-sent events
    GET    /v1/models                 the base (id = its name, alias "base") and every loaded adapter
    GET    /v1/adapters               loaded adapters with content hash, rank, path
    POST   /v1/adapters               admin: JSON {"name", "replace"} loads DIR/<name>; a zip body
                                      (Content-Type application/zip, ?name=&replace=) uploads and installs one
    DELETE /v1/adapters/{name}        admin: unload (files stay; running requests finish on their lease)
    GET    /health, GET /metrics      liveness + queue facts; Prometheus text
    GET    /ui, GET /ui/data          the web page (ui.py): adapters with size, rank, hash, eval metrics; playground

`model` is the base id, an adapter name, or a weighted mix "legal:0.7+tone:0.3" (see engine.py). Extra body
field `ignore_eos` (bool) keeps generating past end-of-sequence. Admin routes need `Authorization: Bearer
<--api-key>`; without --api-key they are disabled. Errors map to HTTP statuses in serve/errors.py only.
A client that disconnects before its answer cancels the generation (it stops taking batch rows).
Prompts are size-checked, then tokenized off the event loop (a huge prompt never delays other requests);
bodies over 16 MiB are refused (413) before they are parsed (bodylimit.py).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import Sequence
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, ValidationError

from ..errors import AdapterNotFoundError, ConfigError, RequestTooLargeError, UnauthorizedError
from ..runtime import AdapterPool
from . import errors, ui
from .adapters import AdapterStore
from .bodylimit import MAX_REQUEST_BYTES, BodyLimit
from .engine import Engine, EngineConfig, Handle, Result, SamplingParams
from ..runtime.decoder import CompactLlama
from .metrics import Metrics
from .protocol import (
    ChatBody,
    CompletionBody,
    DetokenizeBody,
    TokenizeBody,
    chat_logprobs,
    completion_logprobs,
    refused,
    usage,
)
from .text import TextCodec

BASE_ALIAS = "base"
DISCONNECT_POLL_S = 0.25  # how often a waiting non-streamed request checks that its client is still there


class Server:
    """Everything one server process holds: the compact model, the adapter pool and store, the engine."""

    def __init__(self, hf_model, tokenizer, *, base_id: str, adapters_dir=None, config: EngineConfig | None = None,
                 memory_budget: int | None = None, api_key: str | None = None, max_upload_bytes: int = 64 << 20,
                 check_base_model: bool = True, shutdown_timeout: float | None = 30.0,
                 aliases: Sequence[str] = (), compile: bool | str = False) -> None:
        self.base_id = base_id  # the name answers carry; `aliases` (--served-model-name's others) and "base" too
        self.served = tuple(dict.fromkeys((base_id, *aliases)))
        self.base_ids = tuple(dict.fromkeys((*self.served, BASE_ALIAS)))
        self.model = CompactLlama(hf_model, compile=compile)  # compile: see runtime.compiled
        self.metrics = Metrics()
        self.pool = AdapterPool(self.model.layer_shapes(), budget_bytes=memory_budget, dtype=self.model.dtype,
                                device=self.model.device, max_plans=32)
        self.store = AdapterStore(adapters_dir, self.pool, hf_model, reserved=set(self.base_ids), metrics=self.metrics,
                                  max_upload_bytes=max_upload_bytes, check_base_model=check_base_model)
        self.codec = TextCodec.for_model(tokenizer, hf_model)
        self.engine = Engine(self.model, self.pool, self.codec, base_ids=self.base_ids, config=config,
                             metrics=self.metrics, on_step=self.store.poll_evictions)
        self.api_key = api_key
        self.shutdown_timeout = shutdown_timeout
        self.skipped: dict[str, str] = {}
        self.created = int(time.time())
        eng, st = self.engine, self.pool.stats
        self.metrics.add_gauges({
            "loraplex_queue_waiting": ("Requests waiting for a lane.", lambda: eng.waiting),
            "loraplex_running": ("Sequences in the running batch.", lambda: len(eng.running)),
            "loraplex_adapters_loaded": ("Adapters loaded.", lambda: len(self.store.names())),
            "loraplex_pool_resident_bytes": ("Adapter bytes in the fast tier.", lambda: st.resident_bytes),
            "loraplex_pool_budget_bytes": ("Adapter pool budget (0 = none).", lambda: st.budget_bytes or 0),
            "loraplex_pool_evictions": ("Pool evictions in all.", lambda: st.evictions),
            "loraplex_kv_cache_bytes": ("KV cache bytes allocated.", lambda: eng.cache.nbytes),
            "loraplex_engine_steps": ("Scheduler steps run.", lambda: eng.steps),
        })

    def start(self) -> None:
        _, self.skipped = self.store.load_all()
        self.engine.start()

    def stop(self) -> None:
        self.engine.shutdown(drain=True, timeout=self.shutdown_timeout)

    def check_admin(self, request: Request) -> None:
        if self.api_key is None:
            raise UnauthorizedError("admin routes are disabled: start the server with --api-key KEY")
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise UnauthorizedError("admin routes need the header 'Authorization: Bearer <api key>'")


# ---- request bodies (the OpenAI ones are in protocol.py) ------------------------------------------------
class AdapterBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    replace: bool = False


# ---- the app ----------------------------------------------------------------------------------------------
def create_app(server: Server, *, results: ui.ResultsLike = None) -> FastAPI:
    """The ASGI app of `server` (started and drained by the app's lifespan); `results`: eval results shown on
    /ui (an EvalResult or a `loraplex eval --out` JSON path; see ui.set_results)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await asyncio.to_thread(server.start)
        yield
        await asyncio.to_thread(server.stop)

    app = FastAPI(title="loraplex", lifespan=lifespan)
    app.state.server = server
    errors.install(app, on_refused=server.metrics.refused)
    app.add_middleware(BodyLimit, limit=MAX_REQUEST_BYTES, exempt={"/v1/adapters"},  # uploads: their own limit
                       on_refused=server.metrics.refused)
    app.include_router(ui.router)
    ui.set_results(app, results)
    eng = server.engine

    @app.get("/health")
    async def health():
        state = "failed" if eng.failed else ("ok" if eng.accepting else "draining")
        body = {"status": state, "base": server.base_id, "adapters": len(server.store.names()),
                "running": len(eng.running), "waiting": eng.waiting, "skipped_adapters": server.skipped,
                "broken_adapters": dict(server.store.broken)}
        return JSONResponse(body, status_code=200 if state == "ok" else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def card(model_id: str) -> dict:
        parent = {} if model_id in server.base_ids else {"parent": server.base_id}
        return {"id": model_id, "object": "model", "created": server.created, "owned_by": "loraplex",
                "max_model_len": eng.context, **parent}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card(m) for m in (*server.served, *server.store.names())]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        """One model: a served base name, "base", an adapter, or a valid mix of loaded adapters; else 404."""
        try:
            eng.parse_model(model_id)
        except ConfigError:
            raise AdapterNotFoundError(f"model {model_id!r} does not exist: it is neither the base "
                                       f"({server.base_id!r}), a loaded adapter, nor a mix of them") from None
        return card(model_id)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeBody):
        """vLLM's /tokenize (see protocol.TokenizeBody)."""
        if body.model is not None:
            eng.parse_model(body.model)
        limit = eng.config.max_prompt_tokens
        if (body.prompt is None) == (body.messages is None):
            raise refused("prompt", "send either prompt (text) or messages (a chat), exactly one of them")
        if body.messages is not None:
            if not body.add_special_tokens:
                raise refused("add_special_tokens", "a chat is rendered by its template, which writes the "
                                                    "special tokens itself; leave add_special_tokens out")
            msgs = [{"role": m.role, "content": m.text()} for m in body.messages]
            ids = await asyncio.to_thread(server.codec.chat, msgs, limit)
        else:
            ids = await asyncio.to_thread(server.codec.encode, body.prompt, limit, special=body.add_special_tokens)
        return {"count": len(ids), "max_model_len": eng.context, "tokens": ids,
                "token_strs": [server.codec.token_text(t) for t in ids] if body.return_token_strs else None}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeBody):
        if body.model is not None:
            eng.parse_model(body.model)
        bad = [t for t in body.tokens if not 0 <= t < server.model.vocab]
        if bad:
            raise refused("tokens", f"token ids must be in [0, {server.model.vocab}); got {bad[:5]}")
        return {"prompt": await asyncio.to_thread(server.codec.decode, body.tokens)}

    @app.get("/v1/adapters")
    async def adapters():
        return {"object": "list", "data": [
            {"id": i.name, "object": "adapter", "content_hash": i.content_hash, "r": i.rank, "layers": i.layers,
             "resident": server.pool.is_resident(i.name) if i.name in server.pool else False}
            for i in map(server.store.info, server.store.names())]}

    @app.post("/v1/adapters")
    async def add_adapter(request: Request):
        server.check_admin(request)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype in ("application/zip", "application/x-zip-compressed", "application/octet-stream"):
            name = request.query_params.get("name")
            if not name:
                raise ConfigError("a zip upload needs the adapter name as a query parameter: ?name=NAME")
            replace = request.query_params.get("replace", "false").lower() in ("1", "true", "yes")
            data = await _read_limited(request, server.store.max_upload_bytes)
            info = await asyncio.to_thread(server.store.upload, name, data, replace=replace)
        elif ctype == "application/json":
            try:
                body = AdapterBody.model_validate_json(await _read_limited(request, 1 << 16))
            except ValidationError as exc:
                raise RequestValidationError(exc.errors()) from None
            info = await asyncio.to_thread(server.store.load, body.name, replace=body.replace)
        else:
            raise ConfigError(f"Content-Type {ctype or '(none)'!r}: send application/json {{\"name\": ...}} to load "
                              "from the adapter folder, or application/zip to upload an adapter directory")
        return {"id": info.name, "object": "adapter", "content_hash": info.content_hash, "r": info.rank,
                "layers": info.layers}

    @app.delete("/v1/adapters/{name}")
    async def delete_adapter(name: str, request: Request):
        server.check_admin(request)
        await asyncio.to_thread(server.store.remove, name)
        return {"id": name, "object": "adapter", "deleted": True}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        params = [body.params(16, j) for j in range(body.rows())]
        prompts = await asyncio.to_thread(_encode_all, server, body.prompts())
        return await _serve(server, request, body, prompts, params, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request):
        params = [body.params(eng.config.max_new_tokens, j) for j in range(body.rows())]
        msgs = [{"role": m.role, "content": m.text()} for m in body.messages]
        ids = await asyncio.to_thread(server.codec.chat, msgs, eng.config.max_prompt_tokens)
        return await _serve(server, request, body, [ids], params, chat=True)

    return app


async def _read_limited(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) more than `limit` bytes without reading them all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestTooLargeError(f"the body is {declared} bytes; the limit is {limit} (--max-upload-mb)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestTooLargeError(f"the body exceeds the limit of {limit} bytes (--max-upload-mb)")
        chunks.append(chunk)
    return b"".join(chunks)


def _encode_all(server: Server, prompts: list) -> list[list[int]]:
    return [server.codec.encode(p, server.engine.config.max_prompt_tokens) if isinstance(p, str) else list(p)
            for p in prompts]


def _submit_all(server: Server, prompts: list[list[int]], model: str, params: list[SamplingParams]
                ) -> tuple[list[Handle], asyncio.Queue]:
    """Submit len(params) rows per prompt (row k = prompt k // len(params), copy k % len(params)); the queue
    gets (k, event) for each of their events. All or none: a refused row cancels the ones before it."""
    if len(prompts) * len(params) > server.engine.config.max_queue:
        raise RequestTooLargeError(f"{len(prompts)} prompts x {len(params)} answers = {len(prompts) * len(params)} "
                                   f"rows; this server queues at most {server.engine.config.max_queue} (--queue-size)")
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def listener(k: int):
        def put(event) -> None:  # called on the engine thread
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (k, event))
            except RuntimeError:  # the event loop is closed: nobody reads this request's events any more
                pass
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


async def _serve(server: Server, request: Request, body: CompletionBody | ChatBody, prompts: list[list[int]],
                 params: list[SamplingParams], *, chat: bool):
    """Run one request's rows; a client that disconnects before the answer cancels them (streamed: at the
    next chunk; not streamed: within DISCONNECT_POLL_S)."""
    handles, queue = _submit_all(server, prompts, body.model, params)
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    if body.stream:
        return StreamingResponse(_stream(server, handles, queue, rid, created, body, prompts, chat),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    results: list[Result | None] = [None] * len(handles)
    try:
        while any(r is None for r in results):  # the client is checked after every event and DISCONNECT_POLL_S
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


__all__ = ["BASE_ALIAS", "ChatBody", "CompletionBody", "Server", "create_app"]
