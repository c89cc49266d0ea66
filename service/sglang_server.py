"""The embedded engine behind SGLang's HTTP schema (``ctxcache engine --api sglang``).

Lets the gateway's SGLang backend be tested end to end without a GPU: the same endpoints and
fields as an SGLang server (``/generate`` with ``text``/``input_ids`` + ``sampling_params`` and
``meta_info`` in the answer, streaming as server-sent events of cumulative text;
``/v1/chat/completions``; ``/health``; ``/get_model_info``; ``/flush_cache``), with a real model
answering. Prefix reuse over the KV store plays the role of SGLang's radix cache and reports
``cached_tokens``.

Every request field is honoured or refused: a field SGLang has but this stand-in does not
implement (``frequency_penalty``, ``regex``, ``n`` …) is a 400 that names it, never dropped.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ctxcache.engine import Engine, SamplingParams
from ctxcache.engine.generate import stream_from_kv
from ctxcache.errors import CtxCacheError, InvalidInputError
from ctxcache.fusion import FusionContext, PrefixReuse, Segment
from ctxcache.kv import KVStore, MemoryTier


class SGLangSampling(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = -1
    stop: str | list[str] | None = None
    ignore_eos: bool = False
    sampling_seed: int | None = None
    json_schema: str | None = None  # SGLang's constrained decoding: the schema as a JSON string


class GenerateReq(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str | None = None
    input_ids: list[int] | None = None
    sampling_params: SGLangSampling = Field(default_factory=SGLangSampling)
    stream: bool = False


class ChatReq(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = "default"
    messages: list[dict]
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict | None = None  # include_usage: a last chunk with the usage
    # as SGLang's OpenAI server: tools parsed into tool_calls, constrained where required
    tools: list[dict] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict | None = None


def create_sglang_app(engine: Engine) -> FastAPI:
    app = FastAPI(title="ctxcache engine (SGLang API)")
    store = KVStore([MemoryTier(1 << 30)])
    lock = threading.Lock()
    prefix = PrefixReuse()

    def params(sp: SGLangSampling) -> SamplingParams:
        stop = [sp.stop] if isinstance(sp.stop, str) else list(sp.stop or [])
        return SamplingParams(max_tokens=sp.max_new_tokens, temperature=sp.temperature,
                              top_p=sp.top_p, top_k=max(sp.top_k, 0), stop=stop,
                              ignore_eos=sp.ignore_eos, seed=sp.sampling_seed)

    def run(ids: list[int], p: SamplingParams):
        """Prefix reuse (radix-cache stand-in) then decode; yields (text, finish, info)."""
        with lock:
            segs = [Segment.chunk(ids[:-1]), Segment.text(ids[-1:])] if len(ids) > 1 else \
                [Segment.text(ids)]
            res = prefix.build(FusionContext(engine, store), segs)
            info = {"prompt_tokens": len(ids), "cached_tokens": res.stats.reused_tokens}
            text, n = "", 0
            for ch in stream_from_kv(engine, res.kv, res.logits, p):
                text += ch.text
                n += ch.token_id is not None
                yield text, ch.finish_reason, {**info, "completion_tokens": n}

    def last(items):
        """Run ``items`` (``run``'s or ``constrained``'s triples) to the end; the final
        (text, finish, info)."""
        out = ("", None, {})
        for out in items:
            pass
        return out

    async def in_thread(items):
        """The items of the (blocking) iterator ``items``, produced in a worker thread."""
        q: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def work():
            for item in items:
                loop.call_soon_threadsafe(q.put_nowait, item)
            loop.call_soon_threadsafe(q.put_nowait, None)

        threading.Thread(target=work, daemon=True).start()
        while (item := await q.get()) is not None:
            yield item

    def meta(info: dict, finish: str | None, rid: str, t0: float) -> dict:
        fr = None if finish is None else {"type": finish if finish != "cancelled" else "abort"}
        return {"id": rid, "finish_reason": fr, "prompt_tokens": info["prompt_tokens"],
                "completion_tokens": info["completion_tokens"],
                "cached_tokens": info["cached_tokens"], "e2e_latency": time.time() - t0}

    @app.exception_handler(CtxCacheError)
    async def _err(_: Request, e: CtxCacheError):
        return JSONResponse({"error": {"message": str(e)}}, 400)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError):
        parts = []
        for err in e.errors():
            where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            what = "is not supported by this server" if err.get("type") == "extra_forbidden" \
                else err.get("msg", "is invalid")
            parts.append(f"{where} {what}")
        return JSONResponse({"error": {"message": "; ".join(parts)}}, 400)

    @app.get("/health")
    async def health():
        return Response200()

    @app.get("/get_model_info")
    async def model_info():
        return {"model_path": engine.name, "tokenizer_path": engine.name, "is_generation": True}

    @app.post("/flush_cache")
    async def flush():
        for st in store.tiers:
            for k, _ in list(st.tier.scan()):
                st.tier.delete(k)
            st.sizes.clear()
            st.used = 0
        return PlainTextResponse("Cache flushed.\n")

    @app.post("/generate")
    async def generate(req: GenerateReq):
        if req.input_ids:
            ids = engine.as_ids(req.input_ids).tolist()
        elif req.text:
            ids = engine.encode(req.text)
        else:
            return JSONResponse({"error": {"message": "text or input_ids required"}}, 400)
        p = params(req.sampling_params)
        rid, t0 = uuid.uuid4().hex, time.time()
        items = run(ids, p) if req.sampling_params.json_schema is None else \
            await constrained(req, p)
        if not req.stream:
            text, finish, info = await asyncio.to_thread(last, items)
            return {"text": text, "meta_info": meta(info, finish or "length", rid, t0)}

        async def events():
            async for text, finish, info in in_thread(items):
                yield f"data: {json.dumps({'text': text, 'meta_info': meta(info, finish, rid, t0)})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def constrained(req: GenerateReq, p: SamplingParams):
        """``/generate`` with ``json_schema``: decoded under the schema's grammar by the
        embedded backend; (text so far, finish, info) triples like ``run``'s."""
        from ctxcache.service.backends import GenRequest

        if not req.text:
            raise InvalidInputError("sampling_params.json_schema needs text (not input_ids) "
                                    "on this server")
        try:
            schema = json.loads(req.sampling_params.json_schema)
        except ValueError:
            raise InvalidInputError("sampling_params.json_schema is not valid JSON") from None
        gen = GenRequest(params=p, text=req.text, tenant="sglang", schema=schema)
        b = structured_backend()
        await asyncio.to_thread(b.check, gen)
        out = await asyncio.to_thread(b.generate, gen)

        def cumulative():
            text, n = "", 0
            for ch in out.chunks:
                text += ch.text
                n += ch.token_id is not None
                info = {"prompt_tokens": out.info.get("prompt_tokens", 0),
                        "cached_tokens": out.info.get("cached_tokens", 0),
                        "completion_tokens": n}
                yield text, ch.finish_reason, info

        return cumulative()

    backend: dict = {}

    def structured_backend():
        """Tools and response_format need grammar-constrained decoding and the tool-call
        parser: served by the embedded backend (continuous batching) over the same engine."""
        if "b" not in backend:
            from ctxcache.service.backends import EmbeddedBackend

            backend["b"] = EmbeddedBackend(engine, store)
        return backend["b"]

    async def structured(req: ChatReq, p: SamplingParams, rid: str, created: int):
        from ctxcache.service.backends import GenRequest
        from ctxcache.structured import parse_tool_spec, response_schema

        gen = GenRequest(params=p, messages=req.messages, tenant="sglang",
                         tools=parse_tool_spec(req.tools, req.tool_choice,
                                               req.parallel_tool_calls),
                         schema=response_schema(req.response_format))
        b = structured_backend()
        await asyncio.to_thread(b.check, gen)
        out = await asyncio.to_thread(b.generate, gen)
        if not req.stream:
            def collect():
                parts, finish = [], None
                for ch in out.chunks:
                    parts.append(ch.text)
                    finish = ch.finish_reason or finish
                return "".join(parts), finish

            text, finish = await asyncio.to_thread(collect)
            calls = out.info.get("tool_calls") or []
            msg = {"role": "assistant", "content": text or None}
            if calls:
                msg["tool_calls"] = [{k: v for k, v in c.items() if k != "index"}
                                     for c in calls]
            return {"id": rid, "object": "chat.completion", "created": created,
                    "model": req.model, "usage": chat_usage(out.info),
                    "choices": [{"index": 0, "message": msg,
                                 "finish_reason": finish or "length"}]}

        async def events():
            async for ch in in_thread(out.chunks):
                delta: dict = {"content": ch.text} if ch.text else {}
                if ch.finish_reason and out.info.get("tool_calls"):
                    delta["tool_calls"] = out.info["tool_calls"]
                ev = {"id": rid, "object": "chat.completion.chunk", "created": created,
                      "model": req.model, "choices": [{"index": 0, "delta": delta,
                                                       "finish_reason": ch.finish_reason}]}
                yield f"data: {json.dumps(ev)}\n\n"
            for ev in usage_event(req, rid, created, out.info):
                yield ev
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    def usage_event(req: ChatReq, rid: str, created: int, info: dict) -> list[str]:
        """The stream's final usage chunk, when asked for (OpenAI's
        stream_options.include_usage)."""
        if not (req.stream_options or {}).get("include_usage"):
            return []
        ev = {"id": rid, "object": "chat.completion.chunk", "created": created,
              "model": req.model, "choices": [], "usage": chat_usage(info)}
        return [f"data: {json.dumps(ev)}\n\n"]

    def chat_usage(info):
        return {"prompt_tokens": info.get("prompt_tokens", 0),
                "completion_tokens": info.get("completion_tokens", 0),
                "total_tokens": info.get("prompt_tokens", 0) + info.get("completion_tokens", 0),
                "prompt_tokens_details": {"cached_tokens": info.get("cached_tokens", 0)}}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatReq):
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        p = SamplingParams(max_tokens=req.max_tokens or 128, temperature=req.temperature,
                           top_p=req.top_p, stop=stop, seed=req.seed)
        rid, created = "chatcmpl-" + uuid.uuid4().hex, int(time.time())
        if req.tools is not None or req.response_format is not None:
            return await structured(req, p, rid, created)
        ids = engine.chat_ids(req.messages)

        if not req.stream:
            text, finish, info = await asyncio.to_thread(last, run(ids, p))
            return {"id": rid, "object": "chat.completion", "created": created,
                    "model": req.model, "usage": chat_usage(info),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": finish or "length"}]}

        async def events():
            seen, info = "", {}
            async for text, finish, info in in_thread(run(ids, p)):
                delta, seen = text[len(seen):], text
                ev = {"id": rid, "object": "chat.completion.chunk", "created": created,
                      "model": req.model, "choices": [{"index": 0, "delta": {"content": delta},
                                                       "finish_reason": finish}]}
                yield f"data: {json.dumps(ev)}\n\n"
            for ev in usage_event(req, rid, created, info):
                yield ev
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def Response200():  # noqa: N802 - SGLang answers /health with an empty 200
    from fastapi.responses import Response

    return Response(status_code=200)
