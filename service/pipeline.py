"""The one request pipeline: semantic lookup → admission → generation (streamed or not) →
semantic insert → accounting. Chat, completions, RAG and agent turns differ only in how they
build the request and in their response shape (the small functions at the end).
"""

from __future__ import annotations

import asyncio
import logging
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Sequence

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from ctxcache.engine import SamplingParams
from ctxcache.errors import InvalidInputError
from ctxcache.semantic.cache import CacheRequest
from ctxcache.service.backends import GenRequest
from ctxcache.service.errors import APIError, error_body, map_error
from ctxcache.service.gateway import Gateway, QueueFull

log = logging.getLogger(__name__)


@dataclass
class Call:
    """What the pipeline needs to know about one request besides the generation itself."""

    shape: str  # "chat" | "completion" | "rag" | "agent"
    model: str
    tenant: str
    cache_text: str = ""  # the text the semantic cache is keyed by ("" = no caching)
    fp: str = ""  # context fingerprint
    category: str | None = None
    route: str = ""
    cache: bool = True
    doc_ids: Sequence[str] = ()
    extra: dict = field(default_factory=dict)
    on_done: Callable[[str, str], None] | None = None  # (text, finish) after a generation


def sampling(max_tokens: int | None, temperature: float, top_p: float, stop, seed,
             limit: int) -> SamplingParams:
    mt = max_tokens or min(256, limit)
    if mt > limit:
        raise APIError(400, f"max_tokens {mt} exceeds this server's limit of {limit}",
                       code="invalid_value", param="max_tokens")
    return SamplingParams(max_tokens=mt, temperature=temperature, top_p=top_p,
                          stop=list(stop or []), seed=seed)


def usage(prompt: int, completion: int, cached: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


# ---------------------------------------------------------------------------- semantic cache
def lookup(gw: Gateway, call: Call):
    """(hit or None, lookup result or None when the cache is off for this request)."""
    text = call.cache_text
    if gw.semantic is None or not call.cache or not text or \
            len(text) > gw.semantic.max_text_chars:
        return None, None  # too long to key: served uncached, not refused
    if gw.settings.load_adaptive:
        gw.semantic.load.observe(gw.gate.waiting, gw.settings.max_queue)
    try:
        res = gw.semantic.lookup(CacheRequest(text, tenant=call.tenant, category=call.category,
                                              route=call.route, context_fp=call.fp))
    except InvalidInputError as e:
        raise APIError(400, str(e), code="invalid_value") from None
    except Exception:  # noqa: BLE001 - its database is down: serve this request uncached
        log.warning("semantic lookup failed; serving without the cache", exc_info=True)
        gw.metrics.semantic_errors.labels("lookup").inc()
        return None, None
    return res.hit, res


def serves(hit, params: SamplingParams) -> bool:
    """A stored answer stands in for a generation only if that generation would have produced
    it: it must fit in this request's max_tokens (else generation would stop early with
    finish_reason "length") and contain none of its stop sequences (else it would end there)."""
    n = hit.response.get("completion_tokens")  # unknown for entries loaded from elsewhere
    text = hit.response.get("text", "")
    if n is not None and n > params.max_tokens:
        return False
    return not any(s and s in text for s in params.stop)


def insert(gw: Gateway, call: Call, res, response: dict, finish: str) -> None:
    if gw.semantic is None or res is None or not res.cacheable:
        return
    try:
        gw.semantic.insert(CacheRequest(call.cache_text, tenant=call.tenant, context_fp=call.fp,
                                        doc_ids=call.doc_ids),
                           response, finish_reason=finish, embedding=res.embedding,
                           category=res.category)
    except Exception:  # noqa: BLE001 - the answer is already sent; only its caching is lost
        log.warning("semantic insert failed; answer not cached", exc_info=True)
        gw.metrics.semantic_errors.labels("insert").inc()


def in_background(gw: Gateway, what: str, fn) -> None:
    """Best-effort bookkeeping off the request path (verification, exploration)."""

    def run():
        try:
            fn()
        except Exception:  # noqa: BLE001 - statistics only: the answer is already sent
            log.debug("semantic %s failed", what, exc_info=True)
            gw.metrics.semantic_errors.labels(what).inc()

    threading.Thread(target=run, daemon=True, name=f"semantic-{what}").start()


def maybe_verify(gw: Gateway, res, req: GenRequest) -> None:
    """Sampled re-answer of a hit, compared with the cached answer: the false-hit estimate and
    the evidence of verified thresholds (vCache-style)."""
    if gw.semantic is None or not gw.semantic.should_verify():
        return

    def run():
        fresh = "".join(c.text for c in gw.backend.generate(req).chunks)
        gw.semantic.record_outcome(res, {"text": fresh})

    in_background(gw, "verify", run)


def explore(gw: Gateway, res, text: str, finish: str) -> None:
    """A miss whose best candidate lay just below a verified threshold: was it right after all?
    Free evidence (the answer was generated anyway)."""
    if gw.semantic is None or res is None or res.candidate is None or finish != "stop":
        return
    in_background(gw, "explore", lambda: gw.semantic.record_outcome(res, {"text": text}))


# ---------------------------------------------------------------------------- generation
def busy(retry_after: int = 1) -> APIError:
    return APIError(429, "server busy: request queue is full", "rate_limit_error",
                    "queue_full", headers={"Retry-After": str(retry_after)})


def admit(gw: Gateway) -> None:
    """Take a place in the generation queue or refuse with 429."""
    try:
        gw.gate.enter()
    except QueueFull as e:
        gw.metrics.rejected.labels("queue_full").inc()
        raise busy(e.retry_after) from None


def admit_lookup(gw: Gateway) -> None:
    """Take a place in the lookup stage or refuse with 429 — the first thing a request does,
    before the semantic lookup (an embedding) or any tokenizing, so a burst of any size is
    refused in milliseconds."""
    try:
        gw.gate.enter_lookup()
    except QueueFull:
        gw.metrics.rejected.labels("queue_full").inc()
        raise busy() from None


async def run_stream(gw: Gateway, req: GenRequest, request: Request | None
                     ) -> AsyncIterator[dict]:
    """Admit, then generate in a worker thread; an async iterator of events.

    Events: {"text", "finish_reason"} chunks, then {"done": info}. The client going away sets a
    cancel flag that the decode loop checks every token.
    """
    admit(gw)
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

    deadline = time.monotonic() + gw.settings.request_timeout_s

    async def events():
        try:
            while True:
                if request is not None and await request.is_disconnected():
                    cancel.set()
                if time.monotonic() > deadline:  # no request holds a slot past its bound
                    cancel.set()
                    raise APIError(504, f"request exceeded this server's limit of "
                                   f"{gw.settings.request_timeout_s:g} s", "server_error",
                                   "timeout")
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

    return events()


async def collect(events: AsyncIterator[dict]) -> tuple[str, str, int, dict]:
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


def account(gw: Gateway, info: dict, n: int) -> dict:
    p, c = info.get("prompt_tokens", 0), info.get("cached_tokens", 0)
    gw.metrics.prompt_tokens.inc(p)
    gw.metrics.reused_tokens.inc(c)
    gw.metrics.completion_tokens.inc(n)
    if "ttft_s" in info:
        gw.metrics.ttft.labels(gw.backend.name).observe(info["ttft_s"])
    return usage(p, n, c)


def miss_meta(base: dict, info: dict) -> dict:
    m = dict(base)
    m["strategy"] = info.get("strategy")
    st = info.get("stats") or {}
    if st:
        m.update({"reused_tokens": st.get("reused_tokens"),
                  "recomputed_tokens": st.get("recomputed_tokens"),
                  "compute_fraction": round(st.get("compute_fraction", 1.0), 4)})
    if "ttft_s" in info:
        m["ttft_ms"] = round(info["ttft_s"] * 1e3, 2)
    return m


# ---------------------------------------------------------------------------- the pipeline
async def serve(gw: Gateway, request: Request, req: GenRequest, call: Call, *,
                stream: bool):
    """Answer ``req``: from a semantic hit, or by generating (streamed or not)."""
    admit_lookup(gw)
    try:
        try:
            await asyncio.to_thread(gw.backend.check, req)
        except InvalidInputError as e:
            raise APIError(400, str(e), code="invalid_value", param=e.param or (
                "tools" if req.tools is not None else "response_format")) from None
        hit, res = await asyncio.to_thread(lookup, gw, call)
        if hit is not None and not serves(hit, req.params):
            hit = None
    finally:
        gw.gate.leave_lookup()
    if res is not None:
        (gw.metrics.semantic_hits if hit is not None else
         gw.metrics.semantic_misses).labels(res.category).inc()
    ids = Ids(call)
    if hit is not None:
        return answer_hit(gw, req, call, ids, hit, res, stream)
    events = await run_stream(gw, req, request)
    base = {"cache": "miss" if res is not None else "off",
            "category": res.category if res is not None else None, **call.extra}
    headers = {"x-ctxcache-cache": base["cache"]}

    def done(text: str, finish: str, u: dict) -> None:
        insert(gw, call, res, {"text": text, "prompt_tokens": u["prompt_tokens"],
                               "completion_tokens": u["completion_tokens"]}, finish)
        explore(gw, res, text, finish)
        if call.on_done is not None:
            call.on_done(text, finish)

    if not stream:
        text, finish, n, info = await collect(events)
        u = account(gw, info, n)
        await asyncio.to_thread(done, text, finish, u)
        return JSONResponse(body(call, ids, text, finish, u, miss_meta(base, info),
                                 info.get("tool_calls")), headers=headers)

    async def gen_stream():
        parts, finish, n = [], "length", 0
        if call.shape == "chat":
            yield sse(chunk(call, ids, "", None))
        async for ev in events:
            if "done" in ev:
                u = account(gw, ev["done"], n)
                if ev["done"].get("tool_calls"):
                    yield sse(chunk(call, ids, None, None,
                                    tool_calls=ev["done"]["tool_calls"]))
                yield sse(chunk(call, ids, None, finish, u, miss_meta(base, ev["done"])))
                yield "data: [DONE]\n\n"
                await asyncio.to_thread(done, "".join(parts), finish, u)
                return
            parts.append(ev["text"])
            n += ev.get("token", False)
            finish = ev["finish_reason"] or finish
            if ev["text"]:
                yield sse(chunk(call, ids, ev["text"], None))

    async def safe_stream():
        try:
            async for s in gen_stream():
                yield s
        except Exception as e:  # noqa: BLE001 - the status line is already sent
            api = map_error(e)
            yield sse(error_body(api.message, api.type, api.code))
            yield "data: [DONE]\n\n"

    return StreamingResponse(safe_stream(), media_type="text/event-stream", headers=headers)


def answer_hit(gw: Gateway, req: GenRequest, call: Call, ids: "Ids", hit, res, stream: bool):
    gw.metrics.ttft.labels("semantic").observe(res.latency_s + res.embed_s)
    maybe_verify(gw, res, req)
    meta = {"cache": "semantic", "similarity": round(hit.similarity, 4),
            "category": hit.category, "age_s": round(hit.age_s, 3), **call.extra}
    u = usage(hit.response.get("prompt_tokens", 0), hit.response.get("completion_tokens", 0),
              hit.response.get("prompt_tokens", 0))
    text = hit.response.get("text", "")
    headers = {"x-ctxcache-cache": "semantic-hit"}
    if not stream:
        return JSONResponse(body(call, ids, text, "stop", u, meta), headers=headers)

    async def hit_stream():
        yield sse(chunk(call, ids, text, None))
        yield sse(chunk(call, ids, None, "stop", u, meta))
        yield "data: [DONE]\n\n"

    return StreamingResponse(hit_stream(), media_type="text/event-stream", headers=headers)


# ---------------------------------------------------------------------------- response shapes
class Ids:
    def __init__(self, call: Call):
        self.id = ("chatcmpl-" if call.shape == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())


def body(call: Call, ids: Ids, text: str, finish: str, u: dict, meta: dict,
         tool_calls: list[dict] | None = None) -> dict:
    if call.shape == "agent":
        return {"session": call.extra.get("session"), "agent": call.extra.get("agent"),
                "content": text, "finish_reason": finish, "usage": u,
                "ctxcache": {k: meta.get(k) for k in ("strategy", "reused_tokens",
                                                       "recomputed_tokens")}}
    if call.shape == "rag":
        return {"id": ids.id, "object": "rag.answer", "created": ids.created,
                "model": call.model, "answer": text, "finish_reason": finish, "usage": u,
                "ctxcache": meta}
    if call.shape == "chat":
        msg = {"role": "assistant", "content": text}
        if tool_calls:
            msg["content"] = text or None
            msg["tool_calls"] = [{k: v for k, v in c.items() if k != "index"}
                                 for c in tool_calls]
        choice = {"index": 0, "message": msg, "finish_reason": finish, "logprobs": None}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        obj = "text_completion"
    return {"id": ids.id, "object": obj, "created": ids.created, "model": call.model,
            "choices": [choice], "usage": u, "system_fingerprint": "ctxcache", "ctxcache": meta}


def chunk(call: Call, ids: Ids, delta: str | None, finish: str | None, u=None,
          meta=None, tool_calls: list[dict] | None = None) -> dict:
    if call.shape == "chat":
        d = {} if delta is None else {"role": "assistant", "content": delta}
        if tool_calls:
            d = {"role": "assistant", "tool_calls": tool_calls}
        c = {"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}
        o = "chat.completion.chunk"
    else:
        c = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
        o = "text_completion" if call.shape == "completion" else f"{call.shape}.answer.chunk"
    out = {"id": ids.id, "object": o, "created": ids.created, "model": call.model,
           "choices": [c]}
    if u is not None:
        out["usage"] = u
    if meta is not None:
        out["ctxcache"] = meta
    return out
