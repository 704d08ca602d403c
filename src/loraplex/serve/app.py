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
Prompts are size-checked, then tokenized off the event loop (a huge prompt never delays other requests).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from typing import Literal, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import ConfigError, RequestTooLargeError, UnauthorizedError
from ..runtime import AdapterPool
from ..runtime.generate import MAX_TEMPERATURE, SEED_RANGE
from . import errors, ui
from .adapters import AdapterStore
from .engine import Engine, EngineConfig, Handle, Result, SamplingParams
from .llama import CompactLlama
from .metrics import Metrics
from .text import TextCodec

BASE_ALIAS = "base"
DISCONNECT_POLL_S = 0.25  # how often a waiting non-streamed request checks that its client is still there


class Server:
    """Everything one server process holds: the compact model, the adapter pool and store, the engine."""

    def __init__(self, hf_model, tokenizer, *, base_id: str, adapters_dir=None, config: EngineConfig | None = None,
                 memory_budget: int | None = None, api_key: str | None = None, max_upload_bytes: int = 64 << 20,
                 check_base_model: bool = True, shutdown_timeout: float | None = 30.0) -> None:
        self.base_id = base_id
        self.base_ids = (base_id,) if base_id == BASE_ALIAS else (base_id, BASE_ALIAS)
        self.model = CompactLlama(hf_model)
        self.metrics = Metrics()
        self.pool = AdapterPool(self.model.layer_shapes(), budget_bytes=memory_budget, dtype=self.model.dtype,
                                device=self.model.device, max_plans=32)
        self.store = AdapterStore(adapters_dir, self.pool, hf_model, reserved=set(self.base_ids), metrics=self.metrics,
                                  max_upload_bytes=max_upload_bytes, check_base_model=check_base_model)
        self.codec = TextCodec.for_model(tokenizer, hf_model.config)
        self.engine = Engine(self.model, self.pool, self.codec, base_ids=self.base_ids, config=config,
                             metrics=self.metrics, on_step=self.store.poll_evictions)
        self.api_key = api_key
        self.shutdown_timeout = shutdown_timeout
        self.skipped: dict[str, str] = {}
        self.created = int(time.time())

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


# ---- request bodies ---------------------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int | None = 1
    stream: bool | None = False
    stop: Union[str, list[str], None] = None
    seed: int | None = Field(default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    ignore_eos: bool = False
    stream_options: dict | None = None
    logprobs: Union[bool, int, None] = None

    def params(self, default_max: int) -> SamplingParams:
        if self.n not in (None, 1):
            raise ConfigError(f"n={self.n}: this server returns one choice per request; send n=1")
        if self.logprobs:
            raise ConfigError("logprobs are not supported by this server")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(max_tokens=self.max_tokens or default_max,
                              temperature=1.0 if self.temperature is None else self.temperature,
                              top_p=1.0 if self.top_p is None else self.top_p, stop=stop, seed=self.seed,
                              ignore_eos=self.ignore_eos)


class CompletionBody(_Body):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    echo: bool | None = False

    def prompt_ids(self, codec: TextCodec, max_tokens: int) -> list[int]:
        p = self.prompt
        if self.echo:
            raise ConfigError("echo is not supported by this server")
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise ConfigError(f"got {len(p)} prompts; this server takes one prompt per request")
            p = p[0]
        return codec.encode(p, max_tokens) if isinstance(p, str) else list(p)


class _Part(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[_Part], None] = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        if any(p.type != "text" for p in self.content):
            raise ConfigError("only text content parts are supported")
        return "".join(p.text or "" for p in self.content)


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


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
    errors.install(app)
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
        st = server.pool.stats
        gauges = {
            "loraplex_queue_waiting": ("Requests waiting for a lane.", lambda: eng.waiting),
            "loraplex_running": ("Sequences in the running batch.", lambda: len(eng.running)),
            "loraplex_adapters_loaded": ("Adapters loaded.", lambda: len(server.store.names())),
            "loraplex_pool_resident_bytes": ("Adapter bytes in the fast tier.", lambda: st.resident_bytes),
            "loraplex_pool_budget_bytes": ("Adapter pool budget (0 = none).", lambda: st.budget_bytes or 0),
            "loraplex_pool_evictions": ("Pool evictions in all.", lambda: st.evictions),
            "loraplex_kv_cache_bytes": ("KV cache bytes allocated.", lambda: eng.cache.nbytes),
            "loraplex_engine_steps": ("Scheduler steps run.", lambda: eng.steps),
        }
        return PlainTextResponse(server.metrics.render(gauges), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        data = [{"id": server.base_id, "object": "model", "created": server.created, "owned_by": "loraplex"}]
        data += [{"id": n, "object": "model", "created": server.created, "owned_by": "loraplex",
                  "parent": server.base_id} for n in server.store.names()]
        return {"object": "list", "data": data}

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
        params = body.params(16)
        ids = await asyncio.to_thread(body.prompt_ids, server.codec, server.engine.config.max_prompt_tokens)
        return await _serve(server, request, body, ids, params, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request):
        if body.max_completion_tokens and not body.max_tokens:
            body.max_tokens = body.max_completion_tokens
        params = body.params(server.engine.config.max_new_tokens)
        msgs = [{"role": m.role, "content": m.text()} for m in body.messages]
        ids = await asyncio.to_thread(server.codec.chat, msgs, server.engine.config.max_prompt_tokens)
        return await _serve(server, request, body, ids, params, chat=True)

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


def _submit(server: Server, ids: list[int], model: str, params: SamplingParams) -> tuple[Handle, asyncio.Queue]:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def listener(event) -> None:  # called on the engine thread
        try:
            loop.call_soon_threadsafe(queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody reads this request's events any more
            pass

    return server.engine.submit(ids, model, params, listener=listener), queue


async def _serve(server: Server, request: Request, body: _Body, ids: list[int], params: SamplingParams, *,
                 chat: bool):
    """Run one request; a client that disconnects before the answer cancels its generation (streamed: at the
    next chunk; not streamed: within DISCONNECT_POLL_S)."""
    handle, queue = _submit(server, ids, body.model, params)
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    if body.stream:
        usage = bool((body.stream_options or {}).get("include_usage"))
        return StreamingResponse(_stream(handle, queue, rid, created, body.model, chat, usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        while True:  # the client is checked after every event (a delta per step) and every DISCONNECT_POLL_S
            try:
                event = await asyncio.wait_for(queue.get(), timeout=DISCONNECT_POLL_S)
                if event[0] == "done":
                    break
            except asyncio.TimeoutError:
                pass
            if await request.is_disconnected():
                return Response(status_code=499)  # nobody reads it; the finally cancels the generation
    finally:
        if not handle.done:
            handle.cancel()
    res: Result = event[1]
    if res.error is not None:
        return errors.error_response(res.error)
    choice = ({"index": 0, "message": {"role": "assistant", "content": res.text}, "finish_reason": res.finish_reason}
              if chat else {"index": 0, "text": res.text, "finish_reason": res.finish_reason, "logprobs": None})
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": body.model, "choices": [choice], "usage": _usage(res)}


def _usage(res: Result) -> dict:
    return {"prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens,
            "total_tokens": res.prompt_tokens + res.completion_tokens}


async def _stream(handle: Handle, queue: asyncio.Queue, rid: str, created: int, model: str, chat: bool, usage: bool):
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, finish: str | None, role: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        return _sse({"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]})

    try:
        if chat:
            yield chunk(None, None, role=True)
        while True:
            event = await queue.get()
            if event[0] == "delta":
                yield chunk(event[1], None)
                continue
            res: Result = event[1]
            if res.error is not None:
                yield _sse(errors.stream_error(res.error))
                return
            yield chunk(None if chat else "", res.finish_reason)
            if usage:
                yield _sse({"id": rid, "object": obj, "created": created, "model": model, "choices": [],
                            "usage": _usage(res)})
            yield "data: [DONE]\n\n"
            return
    finally:
        if not handle.done:
            handle.cancel()


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


__all__ = ["BASE_ALIAS", "ChatBody", "CompletionBody", "Server", "create_app"]
