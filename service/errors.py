"""API errors: one exception type, the OpenAI error shape, and how library errors map to HTTP."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from ctxcache.errors import CtxCacheError, InvalidInputError, KVMismatchError, UnknownChunkError
from ctxcache.agents.session import SessionCapacityError, UnknownSessionError
from ctxcache.service.backends import BackendUnavailableError
from ctxcache.service.documents import IngestCancelled, UnknownDocumentError


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None,
                 headers: dict | None = None):
        self.status, self.message, self.type, self.code, self.param = (
            status, message, type_, code, param)
        self.headers = headers or {}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """The OpenAI error shape every failure is returned in."""

    error: ErrorDetail


def _doc(description: str, retry: bool = False) -> dict:
    out: dict = {"model": ErrorBody, "description": description}
    if retry:
        out["headers"] = {"Retry-After": {"description": "seconds to wait",
                                          "schema": {"type": "integer"}}}
    return out


# documented on every route (APIRouter(responses=...)), so clients and fuzzers know the shape
ERROR_RESPONSES: dict = {
    400: _doc("invalid input (bad value, malformed JSON, context too long)"),
    413: _doc("request body larger than the server's max_body_bytes"),
    401: _doc("missing or invalid API key"),
    403: _doc("admin key required"),
    404: _doc("unknown model, document, session or disabled feature"),
    429: _doc("rate limit or queue full", retry=True),
    503: _doc("inference backend unavailable", retry=True),
    504: _doc("request ran past the server's request_timeout_s (generation stopped)"),
}


# a route that can stream answers JSON or, with "stream": true, Server-Sent Events
STREAMING_RESPONSES: dict = {200: {
    "description": "the answer as JSON, or as Server-Sent Events (`data: {chunk}` lines, then "
                   "`data: [DONE]`) when the request has \"stream\": true",
    "content": {"application/json": {}, "text/event-stream": {"schema": {"type": "string"}}}}}


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None):
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def map_error(e: Exception) -> APIError:
    if isinstance(e, APIError):
        return e
    if _database_down(e):
        return APIError(503, "database unavailable; retry shortly", "service_unavailable",
                        "database_unavailable", headers={"Retry-After": "5"})
    if isinstance(e, BackendUnavailableError):
        return APIError(503, str(e), "service_unavailable", "backend_unavailable",
                        headers={"Retry-After": "5"})
    if isinstance(e, IngestCancelled):
        return APIError(499, str(e), code="cancelled")
    if isinstance(e, SessionCapacityError):
        return APIError(429, str(e), "rate_limit_error", "sessions_full",
                        headers={"Retry-After": "5"})
    if isinstance(e, RecursionError):
        return APIError(400, "request nested too deeply", code="invalid_value")
    if isinstance(e, (UnknownDocumentError, UnknownSessionError, UnknownChunkError)):
        return APIError(404, str(e), "not_found_error", "not_found")
    if isinstance(e, InvalidInputError) and "exceeds the model" in str(e):
        return APIError(400, str(e), code="context_length_exceeded")
    if isinstance(e, (InvalidInputError, KVMismatchError)):
        return APIError(400, str(e), code="invalid_value")
    if isinstance(e, CtxCacheError):
        return APIError(500, str(e), "server_error")
    return APIError(500, f"internal error: {type(e).__name__}", "server_error")


def _database_down(e: Exception) -> bool:
    """Connection-level database failures (server down, restarting, pool exhausted): worth a
    retry, so 503 rather than 500."""
    from sqlalchemy import exc

    return isinstance(e, (exc.OperationalError, exc.InterfaceError, exc.TimeoutError)) or (
        isinstance(e, exc.DBAPIError) and e.connection_invalidated)


def install_handlers(app: FastAPI) -> None:
    """Every failure leaves the gateway as an OpenAI-shaped error body with a fitting status."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError):
        return JSONResponse(error_body(e.message, e.type, e.code, e.param), e.status,
                            headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body("malformed JSON body", "invalid_request_error",
                                           "invalid_json"), 400)
        loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        msg = "; ".join(f"{'.'.join(str(x) for x in er.get('loc', ()) if x != 'body')}: "
                        f"{er.get('msg')}" for er in errs[:5])
        return JSONResponse(error_body(msg, "invalid_request_error", "invalid_value",
                                       loc or None), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException):
        return JSONResponse(error_body(str(e.detail), "invalid_request_error",
                                       "not_found" if e.status_code == 404 else None),
                            e.status_code)

    @app.exception_handler(CtxCacheError)
    async def _lib(_: Request, e: CtxCacheError):
        api = map_error(e)
        return JSONResponse(error_body(api.message, api.type, api.code), api.status,
                            headers=api.headers)

    @app.exception_handler(Exception)
    async def _other(_: Request, e: Exception):
        api = map_error(e)
        return JSONResponse(error_body(api.message, api.type, api.code), api.status,
                            headers=api.headers)
