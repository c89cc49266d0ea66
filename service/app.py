"""The gateway: FastAPI app, OpenAI-compatible + native RAG / agent / cache-admin API.

Request path: auth → tenant → rate limit → semantic cache (tenant-scoped; hits never touch the
backend, so they keep being served while it is down) → bounded queue → backend (embedded engine
with chunk-KV reuse, or SGLang) → stream → semantic cache insert. The path is written once in
``pipeline.py``; ``routes/`` holds one router per resource, ``deps.py`` the dependencies and
``errors.py`` the error mapping.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from ctxcache.service.errors import APIError, error_body, install_handlers  # noqa: F401
from ctxcache.service.limits import BodyLimit, ShedWhenFull
from ctxcache.service.gateway import Gate, Gateway, Tenant  # noqa: F401 - public names
from ctxcache.service.routes import agents, cache, documents, health, openai, rag
from ctxcache.service.settings import Settings


def create_app(settings: Settings | None = None, gateway: Gateway | None = None) -> FastAPI:
    settings = settings or (gateway.settings if gateway else Settings.load())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if getattr(app.state, "gw", None) is None:
            app.state.gw = Gateway(settings)
        yield
        app.state.gw.close()

    app = FastAPI(title="ctxcache", version="0.1.0", lifespan=lifespan)
    app.state.gw = gateway
    install_handlers(app)
    app.add_middleware(BodyLimit, max_bytes_of=lambda: settings.max_body_bytes)
    app.add_middleware(ShedWhenFull, gate_of=lambda: getattr(
        getattr(app.state, "gw", None), "gate", None))
    for module in (health, openai, documents, rag, agents, cache):
        app.include_router(module.router)
    return app
