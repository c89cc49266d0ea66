"""One description of each endpoint (``_Endpoints``), two transports: ``Client`` runs a request
and returns the decoded JSON; ``AsyncClient`` returns a coroutine of it. Errors come back as
``CtxCacheAPIError`` with the gateway's status, message and code."""

from __future__ import annotations

import asyncio
import os
from typing import Any, Iterable, Sequence

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"


def default_base_url() -> str:
    """``CTXCACHE_BASE_URL`` (or ``CTXCACHE_URL``), else the gateway's default address."""
    return os.environ.get("CTXCACHE_BASE_URL") or os.environ.get("CTXCACHE_URL") or DEFAULT_URL


def root_url(url: str) -> str:
    """The gateway root whether the caller gave it with or without the OpenAI ``/v1``."""
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


class CtxCacheAPIError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(f"{status}: {message}")
        self.status, self.message, self.code = status, message, code


def _raise_for(r: httpx.Response) -> Any:
    if r.status_code < 400:
        return r.json()
    try:
        err = r.json().get("error", {})
        msg, code = err.get("message") or r.text, err.get("code")
    except ValueError:
        msg, code = r.text, None
    raise CtxCacheAPIError(r.status_code, msg, code)


def _docs(documents: Iterable[str | dict]) -> list[dict]:
    out = []
    for d in documents:
        out.append({"text": d} if isinstance(d, str) else dict(d))
    return out


def _drop_none(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


class _Endpoints:
    """Each method names one endpoint and its body; ``_req`` (per transport) sends it."""

    def _req(self, method: str, path: str, **kw) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    # models / documents
    def models(self):
        return self._req("GET", "/v1/models")

    def add_documents(self, documents: Iterable[str | dict], public: bool = False):
        """Ingest texts (or ``{"text", "title", "metadata"}`` dicts): chunked, prefilled and
        stored once; returns one ``{"id", "chunks", "tokens", "created"}`` per document."""
        return self._req("POST", "/v1/documents",
                         json={"documents": _docs(documents), "public": public},
                         key="data")

    def list_documents(self):
        return self._req("GET", "/v1/documents")

    def delete_document(self, doc_id: str):
        return self._req("DELETE", f"/v1/documents/{doc_id}")

    def rag(self, question: str, *, document_ids: Sequence[str] = (),
            passages: Sequence[str] = (), system: str | None = None,
            strategy: str | None = None, max_tokens: int = 256, temperature: float = 0.0,
            stop: Sequence[str] = (), cache: bool = True):
        """Answer from ingested documents and/or passages, reusing their chunk K/V."""
        return self._req("POST", "/v1/rag", json=_drop_none({
            "question": question, "document_ids": list(document_ids),
            "passages": list(passages), "system": system, "strategy": strategy,
            "max_tokens": max_tokens, "temperature": temperature, "stop": list(stop),
            "cache": cache}))

    # agent teams
    def create_session(self, agents: dict[str, str], shared_context: str = ""):
        return self._req("POST", "/v1/agents/sessions",
                         json={"agents": agents, "shared_context": shared_context})

    def get_session(self, session_id: str):
        return self._req("GET", f"/v1/agents/sessions/{session_id}")

    def delete_session(self, session_id: str):
        return self._req("DELETE", f"/v1/agents/sessions/{session_id}")

    def post_message(self, session_id: str, agent: str, content: str):
        return self._req("POST", f"/v1/agents/sessions/{session_id}/messages",
                         json={"agent": agent, "content": content})

    def generate(self, session_id: str, agent: str, *, max_tokens: int = 256,
                 temperature: float = 0.0, strategy: str | None = None, append: bool = True):
        """One agent's turn over the session, reusing the K/V of everything already posted."""
        return self._req("POST", f"/v1/agents/sessions/{session_id}/generate",
                         json=_drop_none({"agent": agent, "max_tokens": max_tokens,
                                          "temperature": temperature, "strategy": strategy,
                                          "append": append}))

    # the semantic cache as a client-side key–value cache
    def cache_lookup(self, prompt: str, scope: str = "", category: str | None = None):
        return self._req("POST", "/v1/cache/lookup", json=_drop_none(
            {"prompt": prompt, "scope": scope, "category": category}))

    def cache_put(self, prompt: str, value: Any, scope: str = "", category: str | None = None):
        return self._req("POST", "/v1/cache/entries", json=_drop_none(
            {"prompt": prompt, "scope": scope, "value": value, "category": category}))

    def cache_clear(self, scope: str = ""):
        return self._req("DELETE", "/v1/cache/entries", params={"scope": scope})


class _Base(_Endpoints):
    def __init__(self, base_url: str | None = None, api_key: str | None = None,
                 timeout: float = 300.0):
        self.base_url = root_url(base_url or default_base_url())
        key = api_key if api_key is not None else os.environ.get("CTXCACHE_API_KEY")
        self.headers = {"Authorization": f"Bearer {key}"} if key and key != "none" else {}
        self.timeout = timeout


class Client(_Base):
    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self._http = httpx.Client(base_url=self.base_url, headers=self.headers,
                                  timeout=self.timeout)

    def _req(self, method: str, path: str, key: str | None = None, **kw) -> Any:
        out = _raise_for(self._http.request(method, path, **kw))
        return out[key] if key else out

    def close(self) -> None:
        self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncClient(_Base):
    """Coroutine methods. The HTTP connection pool belongs to one event loop, so a client
    used from another loop (``asyncio.run`` twice, a test per loop) opens a fresh pool there
    instead of failing on a closed loop."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self._http: httpx.AsyncClient | None = None
        self._loop = None

    def _pool(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._http is None or self._loop is not loop:
            self._http = httpx.AsyncClient(base_url=self.base_url, headers=self.headers,
                                           timeout=self.timeout)
            self._loop = loop
        return self._http

    async def _req(self, method: str, path: str, key: str | None = None, **kw) -> Any:
        out = _raise_for(await self._pool().request(method, path, **kw))
        return out[key] if key else out

    async def aclose(self) -> None:
        if self._http is not None and self._loop is asyncio.get_running_loop():
            await self._http.aclose()
        self._http = None

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.aclose()
