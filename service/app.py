"""The gateway: FastAPI app, OpenAI-compatible + native RAG / agent / cache-admin API.

Request path: auth → tenant → rate limit → semantic cache (tenant-scoped; hits never touch the
backend, so they keep being served while it is down) → bounded queue → backend (embedded engine
with chunk-KV reuse, or SGLang) → stream → semantic cache insert.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from ctxcache.engine import SamplingParams
from ctxcache.errors import CtxCacheError, InvalidInputError, KVMismatchError, UnknownChunkError
from ctxcache.kv.keys import check_namespace
from ctxcache.semantic.cache import CacheRequest, context_fingerprint
from ctxcache.service.agents import AgentSessions, UnknownSessionError, message_text
from ctxcache.service.auth import KeyStore, RateLimiter
from ctxcache.service.backends import Backend, BackendUnavailableError, GenRequest, RagPrompt
from ctxcache.service.documents import DEFAULT_RAG_SYSTEM, DocumentService, UnknownDocumentError
from ctxcache.service.metrics import Metrics
from ctxcache.service.schemas import (
    AgentGenerate, AgentMessage, AgentSessionRequest, ChatCompletionRequest, CompletionRequest,
    DocumentsRequest, FlushRequest, KeyRequest, RagRequest,
)
from ctxcache.service.settings import Settings

log = logging.getLogger("ctxcache.gateway")


# ---------------------------------------------------------------------------- errors
class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None,
                 headers: dict | None = None):
        self.status, self.message, self.type, self.code, self.param = (
            status, message, type_, code, param)
        self.headers = headers or {}


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None):
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _map_error(e: Exception) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, BackendUnavailableError):
        return APIError(503, str(e), "service_unavailable", "backend_unavailable",
                        headers={"Retry-After": "5"})
    if isinstance(e, (UnknownDocumentError, UnknownSessionError, UnknownChunkError)):
        return APIError(404, str(e), "not_found_error", "not_found")
    if isinstance(e, InvalidInputError) and "exceeds the model" in str(e):
        return APIError(400, str(e), code="context_length_exceeded")
    if isinstance(e, (InvalidInputError, KVMismatchError)):
        return APIError(400, str(e), code="invalid_value")
    if isinstance(e, CtxCacheError):
        return APIError(500, str(e), "server_error")
    return APIError(500, f"internal error: {type(e).__name__}", "server_error")


# ---------------------------------------------------------------------------- admission
class QueueFull(Exception):
    pass


class Gate:
    """Bounded admission: ``max_concurrency`` generations run, ``max_queue`` wait, more → 429."""

    def __init__(self, max_concurrency: int, max_queue: int, metrics: Metrics):
        self.sem = threading.BoundedSemaphore(max_concurrency)
        self.max_queue = max_queue
        self.waiting = 0
        self.running = 0
        self.lock = threading.Lock()
        self.metrics = metrics

    def enter(self) -> None:
        with self.lock:
            if self.waiting >= self.max_queue:
                raise QueueFull()
            self.waiting += 1
            self.metrics.queue_depth.set(self.waiting)

    def acquire(self, cancelled: Callable[[], bool]) -> bool:
        """Block until a slot frees (in a worker thread); False if cancelled meanwhile."""
        try:
            while not self.sem.acquire(timeout=0.1):
                if cancelled():
                    return False
            with self.lock:
                self.running += 1
                self.metrics.in_flight.set(self.running)
            return True
        finally:
            with self.lock:
                self.waiting -= 1
                self.metrics.queue_depth.set(self.waiting)

    def release(self) -> None:
        with self.lock:
            self.running -= 1
            self.metrics.in_flight.set(self.running)
        self.sem.release()


# ---------------------------------------------------------------------------- state
@dataclass
class Tenant:
    name: str
    limit_per_min: int
    admin: bool = False


class Gateway:
    """Everything one gateway process holds; built once at start-up."""

    def __init__(self, settings: Settings, backend: Backend | None = None,
                 semantic=None, store=None):
        from ctxcache.db import make_engine, migrate

        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = Metrics()
        self.db = make_engine(settings.database_url)
        migrate(self.db)
        self.store = store
        self.backend = backend or self._make_backend()
        self.semantic = semantic if semantic is not None else self._make_semantic()
        self.keys = KeyStore(self.db)
        self.rate = RateLimiter()
        self.gate = Gate(settings.max_concurrency, settings.max_queue, self.metrics)
        self.docs = DocumentService(self.db, self.backend, self.store, settings.chunk_tokens)
        self.sessions = AgentSessions()
        self.model_names = {settings.model, "default"}
        self.started = time.time()

    def _make_backend(self) -> Backend:
        s = self.settings
        if s.backend == "sglang":
            from ctxcache.service.backends import SGLangBackend

            return SGLangBackend(s.sglang_url, s.sglang_timeout_s, s.model)
        from ctxcache.engine import Engine
        from ctxcache.fusion import Planner, default_strategies
        from ctxcache.kv import DiskTier, KVStore, MemoryTier, RedisTier
        from ctxcache.service.backends import EmbeddedBackend

        engine = Engine.load(s.model, device=s.device, dtype=s.dtype)
        if self.store is None:
            tiers = []
            if s.kv_gpu_bytes and s.device.startswith("cuda"):
                tiers.append(MemoryTier(s.kv_gpu_bytes, s.device))
            tiers.append(MemoryTier(s.kv_cpu_bytes, "cpu"))
            if s.kv_disk_bytes:
                tiers.append(DiskTier(s.data_dir / "kv", s.kv_disk_bytes))
            if s.redis_url:
                tiers.append(RedisTier(s.redis_url, s.kv_redis_bytes))
            self.store = KVStore(tiers, eviction=s.kv_eviction, codec=s.kv_codec)
        planner = Planner(default_strategies(cacheblend={"recompute_ratio": s.recompute_ratio}),
                          default=s.strategy)
        if s.cost_model == "on":  # in the background: serving starts at once, guarded once ready
            from ctxcache.fusion.costmodel import load_or_calibrate

            def calibrate() -> None:
                try:
                    planner.cost_model = load_or_calibrate(engine, planner.strategies)
                except Exception:  # noqa: BLE001 - without a cost model the planner still works
                    log.exception("cost model calibration failed; reuse runs unguarded")

            threading.Thread(target=calibrate, name="cost-model", daemon=True).start()
        return EmbeddedBackend(engine, self.store, planner)

    def _make_semantic(self):
        if not self.settings.semantic_cache:
            return None
        from ctxcache.semantic import LoadAdapter, SemanticCache, TransformerEmbedder

        return SemanticCache(TransformerEmbedder(), db_url=self.settings.database_url,
                             index_dir=self.settings.data_dir / "hnsw",
                             load_adapter=LoadAdapter(enabled=self.settings.load_adaptive),
                             verify_rate=self.settings.semantic_verify_rate)

    def close(self) -> None:
        if self.semantic is not None:
            self.semantic.close()
        if self.store is not None:
            self.store.close()


# ---------------------------------------------------------------------------- helpers
def _sampling(max_tokens: int | None, temperature: float, top_p: float, stop, seed,
              limit: int) -> SamplingParams:
    mt = max_tokens or min(256, limit)
    if mt > limit:
        raise APIError(400, f"max_tokens {mt} exceeds this server's limit of {limit}",
                       code="invalid_value", param="max_tokens")
    return SamplingParams(max_tokens=mt, temperature=temperature, top_p=top_p,
                          stop=list(stop or []), seed=seed)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _run_stream(gw: Gateway, req: GenRequest, request: Request | None
                      ) -> tuple[AsyncIterator[dict], dict]:
    """Start a generation in a worker thread; return an async iterator of events.

    Events: {"text", "finish_reason"} chunks, then {"done": info}. The client going away sets a
    cancel flag that the decode loop checks every token.
    """
    try:
        gw.gate.enter()
    except QueueFull:
        gw.metrics.rejected.labels("queue_full").inc()
        raise APIError(429, "server busy: request queue is full", "rate_limit_error",
                       "queue_full", headers={"Retry-After": "1"}) from None
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()
    req.should_stop = cancel.is_set
    info: dict = {}

    def put(item):
        loop.call_soon_threadsafe(q.put_nowait, item)

    def work():
        if not gw.gate.acquire(cancel.is_set):
            put({"error": APIError(499, "client closed request", code="cancelled")})
            return
        try:
            t0 = time.perf_counter()
            stream = gw.backend.generate(req)
            first = True
            for ch in stream.chunks:
                if first:
                    info["ttft_s"] = time.perf_counter() - t0
                    first = False
                put({"text": ch.text, "finish_reason": ch.finish_reason,
                     "token": ch.token_id is not None})
                if ch.finish_reason:
                    break
            info.update(stream.info)
            put({"done": info})
        except Exception as e:  # noqa: BLE001 - surfaced to the client as an API error
            put({"error": e})
        finally:
            gw.gate.release()

    threading.Thread(target=work, daemon=True, name="generate").start()

    async def events():
        try:
            while True:
                if request is not None and await request.is_disconnected():
                    cancel.set()
                try:
                    item = await asyncio.wait_for(q.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    continue
                if "error" in item:
                    raise item["error"]
                yield item
                if "done" in item:
                    return
        finally:
            cancel.set()  # generator closed early (client gone): stop decoding

    return events(), info


async def _collect(events: AsyncIterator[dict]) -> tuple[str, str, int, dict]:
    parts, finish, n = [], "length", 0
    info: dict = {}
    async for ev in events:
        if "done" in ev:
            info = ev["done"]
            break
        parts.append(ev["text"])
        n += ev.get("token", False)
        finish = ev["finish_reason"] or finish
    return "".join(parts), finish, n, info


def _usage(prompt: int, completion: int, cached: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


# ---------------------------------------------------------------------------- app
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

    # ------------------------------------------------------------------ error handlers
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
        api = _map_error(e)
        return JSONResponse(error_body(api.message, api.type, api.code), api.status,
                            headers=api.headers)

    @app.exception_handler(Exception)
    async def _other(_: Request, e: Exception):
        api = _map_error(e)
        return JSONResponse(error_body(api.message, api.type, api.code), api.status,
                            headers=api.headers)

    # ------------------------------------------------------------------ dependencies
    def gw_dep(request: Request) -> Gateway:
        return request.app.state.gw

    def tenant_dep(request: Request, gw: Gateway = Depends(gw_dep)) -> Tenant:
        auth = request.headers.get("authorization", "")
        key = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        admin_key = gw.settings.admin_key
        if key and admin_key and key == admin_key:
            t = Tenant("admin", 10**9, admin=True)
        elif key and (found := gw.keys.resolve(key)):
            t = Tenant(found[0], found[1])
        elif gw.settings.auth == "none":
            t = Tenant("default", gw.settings.default_rate_limit_per_min,
                       admin=admin_key is None)
        else:
            raise APIError(401, "missing or invalid API key (Authorization: Bearer <key>)",
                           "authentication_error", "invalid_api_key")
        ok, wait = gw.rate.allow(t.name, t.limit_per_min)
        if not ok:
            gw.metrics.rejected.labels("rate_limit").inc()
            raise APIError(429, f"rate limit of {t.limit_per_min} requests/min exceeded",
                           "rate_limit_error", "rate_limit_exceeded",
                           headers={"Retry-After": str(max(1, int(wait + 0.999)))})
        return t

    def admin_dep(t: Tenant = Depends(tenant_dep)) -> Tenant:
        if not t.admin:
            raise APIError(403, "admin key required", "permission_error", "forbidden")
        return t

    def check_model(gw: Gateway, model: str) -> None:
        if model not in gw.model_names:
            raise APIError(404, f"model {model!r} not found; available: {sorted(gw.model_names)}",
                           "invalid_request_error", "model_not_found", "model")

    # ------------------------------------------------------------------ semantic cache glue
    def sem_lookup(gw: Gateway, tenant: str, text: str, fp: str, category: str | None,
                   route: str, enabled: bool):
        if gw.semantic is None or not enabled or len(text) > gw.semantic.max_text_chars:
            return None, None  # too long to key: served uncached, not refused
        if gw.settings.load_adaptive:
            gw.semantic.load.observe(gw.gate.waiting, gw.settings.max_queue)
        try:
            res = gw.semantic.lookup(CacheRequest(text, tenant=tenant, category=category,
                                                  route=route, context_fp=fp))
        except InvalidInputError as e:
            raise APIError(400, str(e), code="invalid_value") from None
        if res.hit is not None:
            gw.metrics.semantic_hits.labels(res.category).inc()
        else:
            gw.metrics.semantic_misses.labels(res.category).inc()
        return res.hit, res

    def sem_insert(gw: Gateway, tenant: str, text: str, fp: str, lookup, response: dict,
                   finish: str, doc_ids=()):
        if gw.semantic is None or lookup is None or not lookup.cacheable:
            return
        gw.semantic.insert(CacheRequest(text, tenant=tenant, context_fp=fp, doc_ids=doc_ids),
                           response, finish_reason=finish, embedding=lookup.embedding,
                           category=lookup.category)

    def maybe_verify(gw: Gateway, hit, req: GenRequest) -> None:
        """Sampled re-answer of a hit in the background (false-hit estimate, vCache-style)."""
        if gw.semantic is None or not gw.semantic.should_verify():
            return

        def run():
            try:
                fresh = "".join(c.text for c in gw.backend.generate(req).chunks)
                a, b = gw.semantic.embedder.embed([fresh, hit.response.get("text", "")])
                gw.semantic.record_verification(hit.category, float(a @ b) >= 0.9)
            except Exception:  # noqa: BLE001 - best effort statistics
                pass

        threading.Thread(target=run, daemon=True).start()

    async def respond(gw: Gateway, request: Request, req: GenRequest, *, stream: bool,
                      shape: str, model: str, hit, lookup, cache_text: str, fp: str,
                      tenant: str, doc_ids=(), extra: dict | None = None):
        """Answer from a semantic hit or a backend generation, streamed or not."""
        rid = ("chatcmpl-" if shape == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        obj = "chat.completion" if shape == "chat" else "text_completion"

        def body(text: str, finish: str, usage: dict, meta: dict) -> dict:
            if shape == "chat":
                choice = {"index": 0, "message": {"role": "assistant", "content": text},
                          "finish_reason": finish, "logprobs": None}
            elif shape == "completion":
                choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            else:
                return {"id": rid, "object": "rag.answer", "created": created, "model": model,
                        "answer": text, "finish_reason": finish, "usage": usage,
                        "ctxcache": meta}
            return {"id": rid, "object": obj, "created": created, "model": model,
                    "choices": [choice], "usage": usage, "system_fingerprint": "ctxcache",
                    "ctxcache": meta}

        def chunk(delta: str | None, finish: str | None, usage=None, meta=None) -> dict:
            if shape == "chat":
                d = {} if delta is None else {"role": "assistant", "content": delta}
                c = {"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}
                o = "chat.completion.chunk"
            else:
                c = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
                o = "text_completion" if shape == "completion" else "rag.answer.chunk"
            out = {"id": rid, "object": o, "created": created, "model": model, "choices": [c]}
            if usage is not None:
                out["usage"] = usage
            if meta is not None:
                out["ctxcache"] = meta
            return out

        if hit is not None:
            gw.metrics.ttft.labels("semantic").observe(lookup.latency_s + lookup.embed_s)
            maybe_verify(gw, hit, req)
            meta = {"cache": "semantic", "similarity": round(hit.similarity, 4),
                    "category": hit.category, "age_s": round(hit.age_s, 3), **(extra or {})}
            usage = _usage(hit.response.get("prompt_tokens", 0),
                           hit.response.get("completion_tokens", 0),
                           hit.response.get("prompt_tokens", 0))
            text = hit.response.get("text", "")
            headers = {"x-ctxcache-cache": "semantic-hit"}
            if not stream:
                return JSONResponse(body(text, "stop", usage, meta), headers=headers)

            async def hit_stream():
                yield _sse(chunk(text, None))
                yield _sse(chunk(None, "stop", usage, meta))
                yield "data: [DONE]\n\n"

            return StreamingResponse(hit_stream(), media_type="text/event-stream",
                                     headers=headers)

        events, info = await _run_stream(gw, req, request)
        miss_meta = {"cache": "miss" if lookup is not None else "off",
                     "category": lookup.category if lookup is not None else None,
                     **(extra or {})}

        def finish_meta(info: dict) -> dict:
            m = dict(miss_meta)
            m["strategy"] = info.get("strategy")
            st = info.get("stats") or {}
            if st:
                m.update({"reused_tokens": st.get("reused_tokens"),
                          "recomputed_tokens": st.get("recomputed_tokens"),
                          "compute_fraction": round(st.get("compute_fraction", 1.0), 4)})
            if "ttft_s" in info:
                m["ttft_ms"] = round(info["ttft_s"] * 1e3, 2)
            return m

        def account(info: dict, n: int) -> dict:
            p, c = info.get("prompt_tokens", 0), info.get("cached_tokens", 0)
            gw.metrics.prompt_tokens.inc(p)
            gw.metrics.reused_tokens.inc(c)
            gw.metrics.completion_tokens.inc(n)
            if "ttft_s" in info:
                gw.metrics.ttft.labels(gw.backend.name).observe(info["ttft_s"])
            return _usage(p, n, c)

        if not stream:
            text, finish, n, info = await _collect(events)
            usage = account(info, n)
            sem_insert(gw, tenant, cache_text, fp, lookup,
                       {"text": text, "prompt_tokens": usage["prompt_tokens"],
                        "completion_tokens": n}, finish, doc_ids)
            return JSONResponse(body(text, finish, usage, finish_meta(info)),
                                headers={"x-ctxcache-cache": miss_meta["cache"]})

        async def gen_stream():
            parts, finish, n = [], "length", 0
            if shape == "chat":
                yield _sse(chunk("", None))
            async for ev in events:
                if "done" in ev:
                    usage = account(ev["done"], n)
                    yield _sse(chunk(None, finish, usage, finish_meta(ev["done"])))
                    yield "data: [DONE]\n\n"
                    text = "".join(parts)
                    sem_insert(gw, tenant, cache_text, fp, lookup,
                               {"text": text, "prompt_tokens": usage["prompt_tokens"],
                                "completion_tokens": n}, finish, doc_ids)
                    return
                parts.append(ev["text"])
                n += ev.get("token", False)
                finish = ev["finish_reason"] or finish
                if ev["text"]:
                    yield _sse(chunk(ev["text"], None))

        async def safe_stream():
            try:
                async for s in gen_stream():
                    yield s
            except Exception as e:  # noqa: BLE001 - the status line is already sent
                api = _map_error(e)
                yield _sse(error_body(api.message, api.type, api.code))
                yield "data: [DONE]\n\n"

        return StreamingResponse(safe_stream(), media_type="text/event-stream",
                                 headers={"x-ctxcache-cache": miss_meta["cache"]})

    # ------------------------------------------------------------------ health & metrics
    @app.get("/health")
    async def health(gw: Gateway = Depends(gw_dep)):
        return {"status": "ok", "backend": gw.backend.name,
                "backend_healthy": await asyncio.to_thread(gw.backend.health),
                "uptime_s": round(time.time() - gw.started, 1)}

    @app.get("/ready")
    async def ready(gw: Gateway = Depends(gw_dep)):
        ok = await asyncio.to_thread(gw.backend.health)
        return JSONResponse({"ready": ok}, 200 if ok else 503)

    @app.get("/metrics")
    async def metrics(gw: Gateway = Depends(gw_dep)):
        return Response(generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # ------------------------------------------------------------------ OpenAI-compatible
    @app.get("/v1/models")
    async def models(gw: Gateway = Depends(gw_dep), t: Tenant = Depends(tenant_dep)):
        return {"object": "list", "data": [
            {"id": m, "object": "model", "created": int(gw.started), "owned_by": "ctxcache"}
            for m in sorted(gw.model_names)]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request,
                   gw: Gateway = Depends(gw_dep), t: Tenant = Depends(tenant_dep)):
        check_model(gw, body.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        if not any(m["content"] for m in messages):
            raise APIError(400, "messages must contain some text", code="invalid_value",
                           param="messages")
        params = _sampling(body.max_completion_tokens or body.max_tokens, body.temperature,
                           body.top_p, body.stop, body.seed, gw.settings.max_tokens_limit)
        last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        history = messages[:-1] if messages[-1]["role"] == "user" else messages
        fp = context_fingerprint(documents=[json.dumps(history)], temperature=body.temperature,
                                 tools=body.tools, model=body.model,
                                 system=json.dumps(body.stop))
        enabled = body.cache and bool(last_user) and not body.tools
        hit, lookup = await asyncio.to_thread(sem_lookup, gw, t.name, last_user, fp,
                                              body.category, "/v1/chat/completions", enabled)
        req = GenRequest(params, t.name, messages=messages)
        return await respond(gw, request, req, stream=body.stream, shape="chat",
                             model=body.model, hit=hit, lookup=lookup, cache_text=last_user,
                             fp=fp, tenant=t.name)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request,
                          gw: Gateway = Depends(gw_dep), t: Tenant = Depends(tenant_dep)):
        check_model(gw, body.model)
        params = _sampling(body.max_tokens or 16, body.temperature, body.top_p, body.stop,
                           body.seed, gw.settings.max_tokens_limit)
        fp = context_fingerprint(temperature=body.temperature, model=body.model,
                                 system=json.dumps(body.stop) + f"|raw|{params.max_tokens}")
        hit, lookup = await asyncio.to_thread(sem_lookup, gw, t.name, body.prompt, fp,
                                              body.category, "/v1/completions", body.cache)
        req = GenRequest(params, t.name, text=body.prompt)
        return await respond(gw, request, req, stream=body.stream, shape="completion",
                             model=body.model, hit=hit, lookup=lookup, cache_text=body.prompt,
                             fp=fp, tenant=t.name)

    # ------------------------------------------------------------------ documents & RAG
    @app.post("/v1/documents")
    async def ingest(body: DocumentsRequest, gw: Gateway = Depends(gw_dep),
                     t: Tenant = Depends(tenant_dep)):
        out = []
        for d in body.documents:
            out.append(await asyncio.to_thread(gw.docs.ingest, t.name, d.text, d.title,
                                               d.metadata, body.public))
        return {"object": "list", "data": out}

    @app.get("/v1/documents")
    async def list_docs(gw: Gateway = Depends(gw_dep), t: Tenant = Depends(tenant_dep)):
        return {"object": "list", "data": await asyncio.to_thread(gw.docs.list, t.name)}

    @app.get("/v1/documents/{doc_id}")
    async def get_doc(doc_id: str, gw: Gateway = Depends(gw_dep),
                      t: Tenant = Depends(tenant_dep)):
        return await asyncio.to_thread(gw.docs.get, t.name, doc_id)

    @app.delete("/v1/documents/{doc_id}")
    async def delete_doc(doc_id: str, gw: Gateway = Depends(gw_dep),
                         t: Tenant = Depends(tenant_dep)):
        out = await asyncio.to_thread(gw.docs.delete, t.name, doc_id)
        if gw.semantic is not None:
            out["semantic_entries_removed"] = await asyncio.to_thread(
                gw.semantic.invalidate, tenant=t.name, doc_id=doc_id)
        return out

    @app.post("/v1/rag")
    async def rag(body: RagRequest, request: Request, gw: Gateway = Depends(gw_dep),
                  t: Tenant = Depends(tenant_dep)):
        if not body.document_ids and not body.passages:
            raise APIError(400, "give document_ids or passages", code="invalid_value")
        passages = await asyncio.to_thread(gw.docs.chunks, t.name, body.document_ids) \
            if body.document_ids else []
        passages += body.passages
        if any(not p.strip() for p in passages):
            raise APIError(400, "passages must not be empty", code="invalid_value",
                           param="passages")
        params = _sampling(body.max_tokens, body.temperature, body.top_p, body.stop, None,
                           gw.settings.max_tokens_limit)
        if body.strategy is not None and body.strategy != "auto" and hasattr(
                gw.backend, "planner") and body.strategy not in gw.backend.planner.strategies:
            raise APIError(400, f"unknown strategy {body.strategy!r}; use one of "
                           f"{sorted(gw.backend.planner.strategies)} or 'auto'",
                           code="invalid_value", param="strategy")
        system = body.system or DEFAULT_RAG_SYSTEM
        fp = context_fingerprint(documents=sorted(body.document_ids) + body.passages,
                                 temperature=body.temperature, system=system,
                                 model=gw.settings.model)
        hit, lookup = await asyncio.to_thread(sem_lookup, gw, t.name, body.question, fp,
                                              None, "/v1/rag", body.cache)
        req = GenRequest(params, t.name, rag=RagPrompt(system, passages, body.question),
                         strategy=body.strategy)
        return await respond(gw, request, req, stream=body.stream, shape="rag",
                             model=gw.settings.model, hit=hit, lookup=lookup,
                             cache_text=body.question, fp=fp, tenant=t.name,
                             doc_ids=body.document_ids,
                             extra={"passages": len(passages)})

    # ------------------------------------------------------------------ agents
    @app.post("/v1/agents/sessions")
    async def new_session(body: AgentSessionRequest, gw: Gateway = Depends(gw_dep),
                          t: Tenant = Depends(tenant_dep)):
        return gw.sessions.create(t.name, body.shared_context, body.agents).as_dict()

    @app.get("/v1/agents/sessions/{sid}")
    async def get_session(sid: str, gw: Gateway = Depends(gw_dep),
                          t: Tenant = Depends(tenant_dep)):
        return gw.sessions.get(t.name, sid).as_dict()

    @app.delete("/v1/agents/sessions/{sid}")
    async def delete_session(sid: str, gw: Gateway = Depends(gw_dep),
                             t: Tenant = Depends(tenant_dep)):
        gw.sessions.delete(t.name, sid)
        return {"id": sid, "deleted": True}

    def _cache_message(gw: Gateway, tenant: str, agent: str, content: str) -> None:
        """Prefill a message once (prefix-free) so every agent can reuse its K/V."""
        engine = getattr(gw.backend, "engine", None)
        if engine is None or gw.store is None:
            return
        from ctxcache.fusion.base import FusionContext, FusionStats
        from ctxcache.fusion.chunks import chunk_kv

        ids = engine.encode(message_text(agent, content).rstrip() + "\n\n")
        chunk_kv(FusionContext(engine, gw.store, tenant), ids, FusionStats("agent"))

    @app.post("/v1/agents/sessions/{sid}/messages")
    async def add_message(sid: str, body: AgentMessage, gw: Gateway = Depends(gw_dep),
                          t: Tenant = Depends(tenant_dep)):
        s = gw.sessions.append(t.name, sid, body.agent, body.content)
        await asyncio.to_thread(_cache_message, gw, t.name, body.agent, body.content)
        return {"id": sid, "messages": len(s.messages)}

    @app.post("/v1/agents/sessions/{sid}/generate")
    async def agent_generate(sid: str, body: AgentGenerate, request: Request,
                             gw: Gateway = Depends(gw_dep), t: Tenant = Depends(tenant_dep)):
        s = gw.sessions.get(t.name, sid)
        if not s.messages and not s.shared_context:
            raise APIError(400, "the session has no context yet", code="invalid_value")
        params = _sampling(body.max_tokens, body.temperature, 1.0, [], None,
                           gw.settings.max_tokens_limit)
        passages = [message_text(a, c) for a, c in s.messages]
        question = f"Reply as {body.agent}, in one message."
        req = GenRequest(params, t.name, rag=RagPrompt(s.system_for(body.agent), passages
                                                       or [s.shared_context], question),
                         strategy=body.strategy)
        events, _ = await _run_stream(gw, req, request)
        text, finish, n, info = await _collect(events)
        if body.append and text.strip():
            gw.sessions.append(t.name, sid, body.agent, text.strip())
            await asyncio.to_thread(_cache_message, gw, t.name, body.agent, text.strip())
        st = info.get("stats") or {}
        return {"session": sid, "agent": body.agent, "content": text, "finish_reason": finish,
                "usage": _usage(info.get("prompt_tokens", 0), n, info.get("cached_tokens", 0)),
                "ctxcache": {"strategy": info.get("strategy"),
                             "reused_tokens": st.get("reused_tokens"),
                             "recomputed_tokens": st.get("recomputed_tokens")}}

    # ------------------------------------------------------------------ cache admin
    @app.get("/v1/cache/stats")
    async def cache_stats(gw: Gateway = Depends(gw_dep), t: Tenant = Depends(admin_dep)):
        out: dict = {"backend": gw.backend.name}
        if gw.semantic is not None:
            out["semantic"] = gw.semantic.stats_dict()
        if gw.store is not None:
            out["kv"] = gw.store.stats()
        planner = getattr(gw.backend, "planner", None)
        if planner is not None:
            out["planner"] = planner.describe()
        return out

    @app.post("/v1/cache/flush")
    async def flush(body: FlushRequest, gw: Gateway = Depends(gw_dep),
                    t: Tenant = Depends(admin_dep)):
        out: dict = {}
        if body.tenant is not None:
            check_namespace(body.tenant)
        if body.semantic and gw.semantic is not None:
            if body.tenant is None and body.category is None and body.document_id is None:
                raise APIError(400, "flush needs a tenant, category or document_id",
                               code="invalid_value")
            out["semantic_entries_removed"] = await asyncio.to_thread(
                gw.semantic.invalidate, tenant=body.tenant, category=body.category,
                doc_id=body.document_id)
        if body.kv:
            if body.tenant is None:
                raise APIError(400, "kv flush needs a tenant", code="invalid_value")
            if gw.store is not None:
                out["kv_entries_removed"] = await asyncio.to_thread(
                    gw.store.delete_namespace, body.tenant)
            else:
                await asyncio.to_thread(gw.backend.flush)
                out["backend_flushed"] = True
        return out

    @app.get("/v1/cache/policies")
    async def get_policies(gw: Gateway = Depends(gw_dep), t: Tenant = Depends(admin_dep)):
        if gw.semantic is None:
            raise APIError(404, "semantic cache is disabled", code="not_found")
        return {c: p.model_dump() for c, p in gw.semantic.policies.items()}

    @app.put("/v1/cache/policies/{category}")
    async def put_policy(category: str, values: dict, gw: Gateway = Depends(gw_dep),
                         t: Tenant = Depends(admin_dep)):
        if gw.semantic is None:
            raise APIError(404, "semantic cache is disabled", code="not_found")
        return gw.semantic.set_policy(category, values).model_dump()

    @app.post("/v1/admin/keys")
    async def create_key(body: KeyRequest, gw: Gateway = Depends(gw_dep),
                         t: Tenant = Depends(admin_dep)):
        key = await asyncio.to_thread(gw.keys.create, body.tenant, body.name,
                                      body.rate_limit_per_min)
        return {"key": key, "tenant": body.tenant, "rate_limit_per_min": body.rate_limit_per_min}

    return app
