"""The ONE place where errors become HTTP responses: status code + OpenAI-style body, as OpenAI and vLLM
answer (a bad request is 400, so the openai client raises BadRequestError):

    {"error": {"message": "...", "type": "invalid_request_error", "code": "model_not_found", "param": null}}

`param` names the request field at fault when one is (a schema error's field, an unknown field, or the
`param` attribute of a ConfigError raised by serve/protocol.py).

`STATUS` is walked in order and the first class the error is an instance of wins, so subclasses come
before their bases. Every LoraplexError that is not listed is a server bug: 500.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import (
    AdapterExistsError,
    AdapterFileError,
    AdapterNotFoundError,
    BaseMismatchError,
    ConfigError,
    LoraplexError,
    NonFiniteError,
    OutputExistsError,
    PoolFullError,
    QueueFullError,
    RequestTimeoutError,
    RequestTooLargeError,
    ShapeMismatchError,
    ShuttingDownError,
    TargetNotFoundError,
    UnauthorizedError,
    UnsupportedFeatureError,
    UnsupportedModuleError,
    WriteError,
)

# (error class, HTTP status, OpenAI error type, code)
STATUS: tuple[tuple[type[LoraplexError], int, str, str], ...] = (
    (AdapterNotFoundError, 404, "invalid_request_error", "model_not_found"),
    (AdapterExistsError, 409, "invalid_request_error", "adapter_exists"),
    (OutputExistsError, 409, "invalid_request_error", "adapter_exists"),
    (RequestTooLargeError, 413, "invalid_request_error", "request_too_large"),
    (UnauthorizedError, 401, "authentication_error", "invalid_api_key"),
    (QueueFullError, 429, "rate_limit_error", "queue_full"),
    (ShuttingDownError, 503, "server_error", "shutting_down"),
    (PoolFullError, 503, "server_error", "adapter_pool_full"),
    (RequestTimeoutError, 504, "server_error", "timeout"),
    (AdapterFileError, 400, "invalid_request_error", "invalid_adapter"),
    (BaseMismatchError, 400, "invalid_request_error", "invalid_adapter"),
    (ShapeMismatchError, 400, "invalid_request_error", "invalid_adapter"),
    (TargetNotFoundError, 400, "invalid_request_error", "invalid_adapter"),
    (NonFiniteError, 400, "invalid_request_error", "invalid_adapter"),
    (UnsupportedModuleError, 400, "invalid_request_error", "invalid_adapter"),
    (WriteError, 507, "server_error", "insufficient_storage"),
    (UnsupportedFeatureError, 400, "invalid_request_error", "unsupported"),
    (ConfigError, 400, "invalid_request_error", "invalid_value"),
)
_BY_HTTP_STATUS = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                   405: "invalid_request_error", 413: "invalid_request_error"}


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> dict:
    """The OpenAI-style error object; text echoed from a request is made encodable (a lone surrogate
    becomes the 6 characters `\\ud800`), so an error about bad text never becomes a 500 itself."""
    def clean(text: str | None) -> str | None:
        return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")

    return {"error": {"message": clean(message), "type": type_, "code": code, "param": clean(param)}}


def classify(exc: LoraplexError) -> tuple[int, str, str]:
    """(status, type, code) of a loraplex error."""
    for cls, status, type_, code in STATUS:
        if isinstance(exc, cls):
            return status, type_, code
    return 500, "server_error", "internal_error"


def error_response(exc: LoraplexError) -> JSONResponse:
    status, type_, code = classify(exc)
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    return JSONResponse(error_body(str(exc), type_, code, getattr(exc, "param", None)), status_code=status,
                        headers=headers)


def stream_error(exc: LoraplexError) -> dict:
    """The body of an error that happens after a stream started (sent as one SSE `data:` event)."""
    _, type_, code = classify(exc)
    return error_body(str(exc), type_, code, getattr(exc, "param", None))


def install(app: FastAPI, on_refused: Callable[[int, str | None], None] | None = None) -> None:
    """Route every error the app can raise through this module; `on_refused(status, code)` is told of each
    (the server counts refused requests)."""

    def counted(response: JSONResponse) -> JSONResponse:
        if on_refused is not None:
            on_refused(response.status_code, json.loads(response.body)["error"]["code"])
        return response

    async def on_loraplex(_: Request, exc: LoraplexError) -> JSONResponse:
        return counted(error_response(exc))

    async def on_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()

        def where(e: dict) -> str:
            return ".".join(str(p) for p in e.get("loc", ()) if p != "body")

        unknown = [where(e) for e in errs if e.get("type") == "extra_forbidden"]
        if unknown:  # a field this server does not honour: refused by name, never ignored
            return counted(JSONResponse(error_body(
                f"unsupported field(s) {', '.join(unknown[:5])}: this server does not implement them (see "
                "docs/serving.md for every OpenAI field and whether it is supported); remove them",
                "invalid_request_error", "unsupported_field", unknown[0]), status_code=400))
        parts = [f"{where(e) or 'body'}: {e.get('msg')}" for e in errs[:5]]
        param = where(errs[0]) if errs else None
        return counted(JSONResponse(error_body("invalid request body: " + "; ".join(parts),
                                               "invalid_request_error", "invalid_body", param or None),
                                    status_code=400))

    async def on_http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = _BY_HTTP_STATUS.get(exc.status_code, "server_error" if exc.status_code >= 500 else "invalid_request_error")
        return counted(JSONResponse(error_body(str(exc.detail), type_, None), status_code=exc.status_code,
                                    headers=getattr(exc, "headers", None)))

    app.add_exception_handler(LoraplexError, on_loraplex)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
