"""Where generation happens, behind one interface: the embedded engine or SGLang over HTTP.

Both take the same ``GenRequest`` (chat messages, raw text, or a RAG/agent prompt made of a
system prompt, passages and a question) and return a ``GenStream``: an iterator of text chunks
plus facts filled in as it runs (prompt tokens, tokens served from cache, strategy statistics).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

import xxhash

from ctxcache.engine import Engine, SamplingParams
from ctxcache.engine.generate import GenerationChunk
from ctxcache.engine.scheduler import EngineRequest, ServingEngine
from ctxcache.errors import CtxCacheError, InvalidInputError
from ctxcache.fusion import FusionContext, Planner, Segment, default_strategies
from ctxcache.fusion.prompts import rag_segments, rag_template  # noqa: F401 - re-exported
from ctxcache.kv.store import KVStore
from ctxcache.structured import (ToolSpec, ToolStreamFilter, response_constraint,
                                 template_messages)


class BackendUnavailableError(CtxCacheError):
    """The inference backend cannot be reached or answered with a server error."""


@dataclass
class RagPrompt:
    system: str
    passages: list[str]  # text of each passage, in the order given
    question: str
    passage_ids: list[list[int]] | None = None  # pre-tokenized chunks (ingested documents)


@dataclass
class GenRequest:
    params: SamplingParams
    tenant: str = "default"
    messages: list[dict] | None = None
    text: str | None = None
    rag: RagPrompt | None = None
    strategy: str | None = None
    should_stop: Callable[[], bool] | None = None
    tools: ToolSpec | None = None  # OpenAI tools / tool_choice / parallel_tool_calls
    schema: dict | bool | None = None  # response_format's JSON schema (None: plain text)
    constraint: object = None  # its grammar constraint, made by ``Backend.check``
    recompute_ratio: float | None = None  # per-request override of the strategy's ratio


@dataclass
class GenStream:
    chunks: Iterator[GenerationChunk]
    info: dict = field(default_factory=dict)  # prompt_tokens, cached_tokens, strategy, stats


class Backend(ABC):
    name = "backend"

    @abstractmethod
    def generate(self, req: GenRequest) -> GenStream: ...

    def check(self, req: GenRequest) -> None:
        """Refuse what this backend cannot do before anything is sent to the client (so a
        streamed request still gets a 400, not an error event)."""

    def capabilities(self) -> dict:
        """What the served model can do beyond plain chat (reported on ``/v1/models``, so a
        client such as LlamaIndex can say truthfully whether it may send tools)."""
        return {"tool_calling": False, "structured_output": False}

    @abstractmethod
    def health(self) -> bool: ...

    @abstractmethod
    def model_info(self) -> dict: ...

    def flush(self) -> None:  # pragma: no cover - optional
        pass


def conversation_as_chunks(segs: list[Segment]) -> list[Segment]:
    """A templated conversation laid out for a position-independent reuse strategy: the first
    message (the system prompt, with the tools) is the exact prefix, every later message a
    chunk — keyed by its own tokens, so another agent's request with *another* system prompt
    reuses the messages it shares — and the last message with the generation prompt is the
    text computed for the answer. Prefix reuse (the default) needs no such layout: it is exact
    only up to the first message that differs."""
    if len(segs) < 2:
        return [Segment.text(segs[0].token_ids)] if segs else []
    return ([Segment.prefix(segs[0].token_ids)]
            + [Segment.chunk(s.token_ids) for s in segs[1:-1]]
            + [Segment.text(segs[-1].token_ids)])


class EmbeddedBackend(Backend):
    """Our engine: chat and text prompts reuse their cached prefix (exact), RAG and agent
    prompts go through the planner's reuse strategies over the chunk KV store.

    Generations run in the continuous-batching ``ServingEngine``: each request's prefill is
    its strategy's build (on the engine thread, at admission), then it decodes in one batch
    with every other running request."""

    name = "embedded"

    def __init__(self, engine: Engine, store: KVStore, planner: Planner | None = None,
                 recompute_ratio: float = 0.15, serving: ServingEngine | None = None,
                 **serving_options):
        self.engine = engine
        self.store = store
        self.planner = planner or Planner(
            default_strategies(cacheblend={"recompute_ratio": recompute_ratio}),
            default="cacheblend")
        self.serving = serving or ServingEngine(engine, **serving_options)
        if self.planner.defer_checks:  # answer checks run while the engine is idle
            self.serving.idle_work = self.planner.run_deferred

    def _segments_for_chat(self, messages: list[dict], tools: list[dict] | None = None
                           ) -> list[Segment]:
        """Split the templated conversation at message boundaries so each turn is a cacheable
        segment (prefix reuse then skips the whole shared history)."""
        full, cuts = self.engine.chat_segments(messages, tools)
        segs, prev = [], 0
        for c in cuts + [len(full)]:
            if c > prev:
                segs.append(Segment.chunk(full[prev:c]))
                prev = c
        return segs

    def rag_segments(self, rag: RagPrompt) -> list[Segment]:
        return rag_segments(self.engine, rag.system, rag.passages, rag.question,
                            rag.passage_ids)

    def generate(self, req: GenRequest) -> GenStream:
        e = self.engine
        ctx = FusionContext(e, self.store, req.tenant)  # decode runs in pool pages, no room
        if req.rag is not None:
            segs = self.rag_segments(req.rag)
            strategy = req.strategy
        elif req.messages is not None:
            segs = self._segments_for_chat(template_messages(req.messages),
                                           req.tools.rendered() if req.tools else None)
            strategy = req.strategy or "prefix"
            if strategy != "prefix":
                segs = conversation_as_chunks(segs)
        elif req.text is not None:
            e.check_prompt_chars(len(req.text))
            segs = [Segment.chunk(e.encode(req.text))]
            strategy = "prefix"
        else:
            raise InvalidInputError("nothing to generate from")
        n_prompt = sum(len(s.token_ids or []) for s in segs)
        if n_prompt + req.params.max_tokens > e.spec.max_positions:
            raise InvalidInputError(
                f"prompt of {n_prompt} tokens + max_tokens {req.params.max_tokens} exceeds the "
                f"model's context of {e.spec.max_positions} tokens")
        exact = 0
        for s in segs:  # the leading prefix segments are computed exactly by every strategy
            if s.role != "prefix":
                break
            exact += len(s.token_ids or [])
        constraint = req.constraint if req.constraint is not None else self._constraint(req)
        if strategy == "prefix":  # exact: its resident pages in the pool are reused too
            prompt_ids = [t for s in segs for t in s.token_ids]

            def build(resident):
                return self.planner.run(replace(ctx, resident=resident), segs, strategy,
                                        req.recompute_ratio)
        else:
            prompt_ids = None

            def build():
                return self.planner.run(ctx, segs, strategy, req.recompute_ratio)
        handle = self.serving.submit(EngineRequest(
            build, req.params, n_prompt, exact, req.should_stop, constraint,
            prompt_ids=prompt_ids, namespace=req.tenant))
        if req.tools is None or req.tools.choice == "none":
            return GenStream(iter(handle), handle.info)
        return GenStream(self._tool_chunks(iter(handle), req.tools, handle.info), handle.info)

    def check(self, req: GenRequest) -> None:
        if req.recompute_ratio is not None:
            name = req.strategy or self.planner.default
            if name != "auto" and name in self.planner.strategies and \
                    self.planner.strategies[name].ratio_attr is None:
                raise InvalidInputError(f"recompute_ratio does not apply to strategy {name!r} "
                                        "(it has no recompute step)", param="recompute_ratio")
        req.constraint = self._constraint(req)

    def _constraint(self, req: GenRequest):
        e = self.engine
        if req.tools is not None and req.tools.choice != "none":
            if req.messages is None:
                raise InvalidInputError("tools are only supported with chat messages")
            if req.schema is not None and req.tools.choice == "auto":
                raise InvalidInputError("response_format together with tools and tool_choice "
                                        "'auto' is not supported: pick one")
            e.tool_format.check()
            return e.tool_format.constraint(e.grammar, req.tools)
        if req.schema is not None:
            return response_constraint(e.grammar, req.schema)
        return None

    def _tool_chunks(self, chunks, spec: ToolSpec, info: dict):
        """Stream the answer's content; its tool calls, parsed at the end, go to
        ``info["tool_calls"]`` and the finish reason becomes ``tool_calls``."""
        filt = ToolStreamFilter(self.engine.tool_format, spec)
        for ch in chunks:
            text = filt.push(ch.text)
            if not ch.finish_reason:
                yield GenerationChunk(text, ch.token_id)
                continue
            rest, calls = filt.finish()
            info["tool_calls"] = [c.openai(i) for i, c in enumerate(calls)]
            reason = "tool_calls" if calls and ch.finish_reason == "stop" else ch.finish_reason
            yield GenerationChunk(text + rest, ch.token_id, reason)
            return

    def capabilities(self) -> dict:
        return {"tool_calling": self.engine.tool_format.supported, "structured_output": True}

    def close(self) -> None:
        self.serving.close()

    def health(self) -> bool:
        return True

    def model_info(self) -> dict:
        return {"model_path": self.engine.name, "fingerprint": self.engine.fingerprint,
                "is_generation": True, "max_positions": self.engine.spec.max_positions}


class SGLangBackend(Backend):
    """An SGLang server over its HTTP API (``/generate``, ``/v1/chat/completions``, ``/health``,
    ``/get_model_info``, ``/flush_cache``).

    RAG prompts are laid out for SGLang's radix prefix cache: the system prompt first, then the
    passages in a canonical order (by content hash, so the same documents retrieved in another
    order still share a prefix), then the question.
    """

    name = "sglang"

    def __init__(self, url: str, timeout_s: float = 120.0, model: str | None = None):
        import httpx

        self.url = url.rstrip("/")
        self.client = httpx.Client(base_url=self.url, timeout=timeout_s)
        self._httpx = httpx
        self._model = model

    def _call(self, method: str, path: str, **kw):
        try:
            r = self.client.request(method, path, **kw)
        except self._httpx.HTTPError as e:
            raise BackendUnavailableError(f"SGLang at {self.url} unreachable: {e}") from e
        if r.status_code >= 500:
            raise BackendUnavailableError(f"SGLang {path} answered {r.status_code}: {r.text[:200]}")
        if r.status_code >= 400:
            raise InvalidInputError(f"SGLang rejected the request: {r.text[:300]}")
        return r

    @staticmethod
    def canonical_passages(passages: list[str]) -> list[str]:
        return sorted(passages, key=lambda p: xxhash.xxh3_64_hexdigest(p.encode()))

    def _sampling(self, p: SamplingParams) -> dict:
        sp = {"max_new_tokens": p.max_tokens, "temperature": p.temperature, "top_p": p.top_p}
        if p.top_k:
            sp["top_k"] = p.top_k
        if p.stop:
            sp["stop"] = list(p.stop)
        if p.seed is not None:  # SGLang's per-request sampling seed
            sp["sampling_seed"] = p.seed
        return sp

    def generate(self, req: GenRequest) -> GenStream:
        if req.rag is not None:
            passages = "".join(p.rstrip() + "\n\n" for p in self.canonical_passages(req.rag.passages))
            messages = [{"role": "system", "content": req.rag.system},
                        {"role": "user", "content": passages + req.rag.question}]
            return self._chat(messages, req)
        if req.messages is not None:
            return self._chat(req.messages, req)
        if req.text is None:
            raise InvalidInputError("nothing to generate from")
        return self._generate_text(req.text, req)

    def _sse(self, path: str, payload: dict) -> Iterator[dict]:
        try:
            with self.client.stream("POST", path, json=payload) as r:
                if r.status_code >= 400:
                    body = r.read().decode(errors="replace")
                    if r.status_code >= 500:
                        raise BackendUnavailableError(f"SGLang {path}: {r.status_code} {body[:200]}")
                    raise InvalidInputError(f"SGLang rejected the request: {body[:300]}")
                for line in r.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    yield json.loads(data)
        except self._httpx.HTTPError as e:
            raise BackendUnavailableError(f"SGLang at {self.url} unreachable: {e}") from e

    def check(self, req: GenRequest) -> None:
        if req.tools is not None and req.messages is None and req.tools.choice != "none":
            raise InvalidInputError("tools are only supported with chat messages")
        if req.strategy is not None:
            raise InvalidInputError("strategy picks a reuse strategy of the embedded engine; "
                                    "the SGLang backend reuses prefixes with its own radix "
                                    "cache", param="strategy")

    def _generate_text(self, text: str, req: GenRequest) -> GenStream:
        info: dict = {"strategy": "sglang"}
        sp = self._sampling(req.params)
        if req.schema is not None:  # SGLang's /generate takes the schema as a JSON string
            sp["json_schema"] = json.dumps(req.schema)
        payload = {"text": text, "sampling_params": sp, "stream": True}

        def chunks() -> Iterator[GenerationChunk]:
            seen = ""
            for ev in self._sse("/generate", payload):
                if req.should_stop is not None and req.should_stop():
                    yield GenerationChunk("", None, "cancelled")
                    return
                full = ev.get("text", "")
                delta, seen = full[len(seen):], full
                meta = ev.get("meta_info", {})
                info["prompt_tokens"] = meta.get("prompt_tokens", 0)
                info["cached_tokens"] = meta.get("cached_tokens", 0)
                fr = meta.get("finish_reason")
                reason = fr.get("type") if isinstance(fr, dict) else fr
                yield GenerationChunk(delta, None, reason if reason in ("stop", "length") else None)
        return GenStream(chunks(), info)

    def _chat(self, messages: list[dict], req: GenRequest) -> GenStream:
        info: dict = {"strategy": "sglang"}
        p = req.params
        payload = {"model": self._model or "default", "messages": messages, "stream": True,
                   "max_tokens": p.max_tokens, "temperature": p.temperature, "top_p": p.top_p,
                   "stream_options": {"include_usage": True}}
        if p.stop:
            payload["stop"] = list(p.stop)
        if p.seed is not None:
            payload["seed"] = p.seed
        if req.schema is not None:
            payload["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "response", "schema": req.schema, "strict": True}}
        if req.tools is not None:  # SGLang parses the model's tool calls itself
            t = req.tools
            payload["tools"] = t.tools
            payload["tool_choice"] = ({"type": "function", "function": {"name": t.name}}
                                      if t.choice == "named" else t.choice)
            payload["parallel_tool_calls"] = t.parallel
        calls: dict[int, dict] = {}

        def chunks() -> Iterator[GenerationChunk]:
            for ev in self._sse("/v1/chat/completions", payload):
                if req.should_stop is not None and req.should_stop():
                    yield GenerationChunk("", None, "cancelled")
                    return
                usage = ev.get("usage")
                if usage:
                    info["prompt_tokens"] = usage.get("prompt_tokens", 0)
                    info["cached_tokens"] = (usage.get("prompt_tokens_details") or {}).get(
                        "cached_tokens", 0)
                for ch in ev.get("choices", []):
                    d = ch.get("delta") or {}
                    for tc in d.get("tool_calls") or []:  # streamed as deltas: accumulate
                        c = calls.setdefault(tc.get("index", len(calls)), {
                            "id": tc.get("id"), "type": "function",
                            "function": {"name": "", "arguments": ""}})
                        fn = tc.get("function") or {}
                        c["id"] = tc.get("id") or c["id"]
                        c["function"]["name"] += fn.get("name") or ""
                        c["function"]["arguments"] += fn.get("arguments") or ""
                    if calls:
                        info["tool_calls"] = [dict(calls[i], index=n)
                                              for n, i in enumerate(sorted(calls))]
                    yield GenerationChunk(d.get("content") or "", None, ch.get("finish_reason"))
        return GenStream(chunks(), info)

    def capabilities(self) -> dict:
        # passed through to SGLang's OpenAI endpoint, which parses tool calls when it was
        # started with a tool-call parser for its model
        return {"tool_calling": True, "structured_output": True}

    def health(self) -> bool:
        try:
            return self.client.get("/health", timeout=5).status_code == 200
        except self._httpx.HTTPError:
            return False

    def model_info(self) -> dict:
        return self._call("GET", "/get_model_info").json()

    def flush(self) -> None:
        self._call("POST", "/flush_cache")
