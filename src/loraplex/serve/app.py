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
bodies over 16 MiB are refused (413) before they are parsed (bodylimit.py). How a completion's rows are
submitted and answered (JSON or server-sent events) is answers.py.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Sequence
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, ValidationError

from ..errors import AdapterNotFoundError, ConfigError, RequestTooLargeError, UnauthorizedError
from ..runtime import AdapterPool
from . import errors, ui
from .adapters import ServedAdapters
from .answers import Inbox, answer, encode_all
from .bodylimit import MAX_REQUEST_BYTES, BodyLimit
from .engine import Engine, EngineConfig
from ..runtime.decoder import CompactLlama
from .metrics import Metrics
from .protocol import ChatBody, CompletionBody, DetokenizeBody, TokenizeBody, refused
from .text import TextCodec
from .threads import in_fresh_thread, to_fresh_thread

BASE_ALIAS = "base"


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
        for key, (vocab, dim) in self.model.embedding_shapes().items():
            self.pool.register_layer(key, vocab, dim, embedding=True)
        self.store = ServedAdapters(adapters_dir, self.pool, hf_model, reserved=set(self.base_ids),
                                    metrics=self.metrics, max_upload_bytes=max_upload_bytes,
                                    check_base_model=check_base_model)
        self.codec = TextCodec.for_model(tokenizer, hf_model)
        self.engine = Engine(self.model, self.pool, self.codec, base_ids=self.base_ids, config=config,
                             metrics=self.metrics, on_step=self.store.poll_evictions)
        self.api_key = api_key
        self.inbox: Inbox | None = None  # engine events into the event loop (answers.py)
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
        """Load the adapters, compile the decode graph when compiling (on a thread that ends: serve/threads.py),
        then start the engine."""
        _, self.skipped = self.store.load_all()
        in_fresh_thread(self.model.warm_up, self.engine.cache)
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
        await to_fresh_thread(server.start)
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
            info = await to_fresh_thread(server.store.upload, name, data, replace=replace)
        elif ctype == "application/json":
            try:
                body = AdapterBody.model_validate_json(await _read_limited(request, 1 << 16))
            except ValidationError as exc:
                raise RequestValidationError(exc.errors()) from None
            info = await to_fresh_thread(server.store.load, body.name, replace=body.replace)
        else:
            raise ConfigError(f"Content-Type {ctype or '(none)'!r}: send application/json {{\"name\": ...}} to load "
                              "from the adapter folder, or application/zip to upload an adapter directory")
        return {"id": info.name, "object": "adapter", "content_hash": info.content_hash, "r": info.rank,
                "layers": info.layers}

    @app.delete("/v1/adapters/{name}")
    async def delete_adapter(name: str, request: Request):
        server.check_admin(request)
        await to_fresh_thread(server.store.remove, name)
        return {"id": name, "object": "adapter", "deleted": True}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        params = [body.params(16, j) for j in range(body.rows())]
        prompts = await asyncio.to_thread(encode_all, server, body.prompts())
        return await answer(server, request, body, prompts, params, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request):
        params = [body.params(eng.config.max_new_tokens, j) for j in range(body.rows())]
        msgs = [{"role": m.role, "content": m.text()} for m in body.messages]
        ids = await asyncio.to_thread(server.codec.chat, msgs, eng.config.max_prompt_tokens)
        return await answer(server, request, body, [ids], params, chat=True)

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


__all__ = ["BASE_ALIAS", "ChatBody", "CompletionBody", "Server", "create_app"]
