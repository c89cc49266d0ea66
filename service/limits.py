"""Request body size limit, enforced before the body is read.

Why an ASGI middleware and not a pydantic bound: a field limit is checked after the whole body
has been received, parsed and validated — seconds and gigabytes for a 100 MB body. Here a
declared ``Content-Length`` over the limit is answered 413 at once, and a body sent without one
(chunked) is cut off as soon as it passes the limit.
"""

from __future__ import annotations

import json


class BodyTooLarge(Exception):
    pass


def _reply(limit: int) -> tuple[dict, bytes]:
    body = json.dumps({"error": {
        "message": f"request body exceeds this server's limit of {limit} bytes",
        "type": "invalid_request_error", "param": None, "code": "body_too_large"}}).encode()
    start = {"type": "http.response.start", "status": 413,
             "headers": [(b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())]}
    return start, body


class BodyLimit:
    def __init__(self, app, max_bytes_of):
        self.app = app
        self.max_bytes_of = max_bytes_of  # callable: read per request (settings may change)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.max_bytes_of()
        for k, v in scope.get("headers", ()):
            if k == b"content-length":
                try:
                    declared = int(v)
                except ValueError:
                    declared = 0
                if declared > limit:
                    start, body = _reply(limit)
                    await send(start)
                    await send({"type": "http.response.body", "body": body})
                    return
        seen = 0
        started = False

        async def limited_receive():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge()
            return msg

        async def tracking_send(msg):
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                start, body = _reply(limit)
                await send(start)
                await send({"type": "http.response.body", "body": body})


SHED_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/rag", "/v1/documents")


class ShedWhenFull:
    """429 before the body is read or validated when every lookup place is taken.

    The pipeline would refuse such a request anyway once it reaches ``admit_lookup``; refusing it
    here skips JSON parsing, validation and routing, which under a burst of a thousand requests
    were most of the time a refusal took."""

    def __init__(self, app, gate_of):
        self.app = app
        self.gate_of = gate_of  # callable: the gateway's Gate, or None before start-up

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("method") == "POST":
            path = scope.get("path", "")
            gate = self.gate_of()
            if gate is not None and (path in SHED_PATHS or (
                    path.startswith("/v1/agents/sessions/") and path.endswith("/generate"))) \
                    and gate.looking >= gate.max_lookups:
                body = json.dumps({"error": {
                    "message": "server busy: request queue is full",
                    "type": "rate_limit_error", "param": None, "code": "queue_full"}}).encode()
                await send({"type": "http.response.start", "status": 429, "headers": [
                    (b"content-type", b"application/json"), (b"retry-after", b"1"),
                    (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)
