"""``CtxCacheSynthesizer``: a response synthesizer that hands the retrieved nodes to the gateway
as cacheable chunks instead of pasting them into one prompt string.

Any LlamaIndex retriever / query engine works unchanged; the gateway prefills each distinct
chunk once, and later questions that retrieve the same chunks — in any order — reuse their
K/V (CacheBlend-style selective recompute keeps the answer close to a full prefill).

    engine = RetrieverQueryEngine(retriever, response_synthesizer=CtxCacheSynthesizer())
"""

from __future__ import annotations

from typing import Any, AsyncGenerator, Generator, Optional, Sequence

from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.prompts.mixin import PromptDictType
from llama_index.core.response_synthesizers.base import BaseSynthesizer
from llama_index.core.schema import BaseNode

from llama_index.llms.ctxcache.base import CtxCache, ctxcache_meta


class CtxCacheSynthesizer(BaseSynthesizer):
    def __init__(self, llm: Optional[CtxCache] = None, system_prompt: Optional[str] = None,
                 strategy: Optional[str] = None, streaming: bool = False,
                 **kwargs: Any) -> None:
        llm = llm or CtxCache()
        if not isinstance(llm, CtxCache):
            raise TypeError("CtxCacheSynthesizer needs a CtxCache LLM (the chunks are sent "
                            "to the gateway as cacheable passages)")
        super().__init__(llm=llm, streaming=streaming, **kwargs)
        self.system_prompt = system_prompt
        self.strategy = strategy
        self.last_meta: Optional[dict] = None  # the gateway's report on the latest answer

    def _get_prompts(self) -> PromptDictType:
        return {}

    def _update_prompts(self, prompts: PromptDictType) -> None:
        pass  # the layout (system, passages, question) is the gateway's RAG template

    def _messages(self, query_str: str) -> list[ChatMessage]:
        msgs = [ChatMessage(role="system", content=self.system_prompt)] \
            if self.system_prompt else []
        return msgs + [ChatMessage(role="user", content=query_str)]

    def _extras(self, text_chunks: Sequence[str]) -> dict[str, Any]:
        return {"passages": [c for c in text_chunks if c.strip()], "strategy": self.strategy}

    def get_response(self, query_str: str, text_chunks: Sequence[str],
                     **response_kwargs: Any) -> str | Generator[str, None, None]:
        msgs, extras = self._messages(query_str), self._extras(text_chunks)
        if self._streaming:
            return self._stream(self._llm.stream_chat(msgs, **extras))
        r = self._llm.chat(msgs, **extras)
        self.last_meta = ctxcache_meta(r)
        return r.message.content or ""

    def _stream(self, gen) -> Generator[str, None, None]:
        for r in gen:
            meta = ctxcache_meta(r)
            if meta is not None:
                self.last_meta = meta
            if r.delta:
                yield r.delta

    async def aget_response(self, query_str: str, text_chunks: Sequence[str],
                            **response_kwargs: Any) -> str | AsyncGenerator[str, None]:
        msgs, extras = self._messages(query_str), self._extras(text_chunks)
        if self._streaming:
            return self._astream(await self._llm.astream_chat(msgs, **extras))
        r = await self._llm.achat(msgs, **extras)
        self.last_meta = ctxcache_meta(r)
        return r.message.content or ""

    async def _astream(self, gen) -> AsyncGenerator[str, None]:
        async for r in gen:
            meta = ctxcache_meta(r)
            if meta is not None:
                self.last_meta = meta
            if r.delta:
                yield r.delta

    def _get_metadata_for_response(self, nodes: list[BaseNode]) -> Optional[dict[str, Any]]:
        out = super()._get_metadata_for_response(nodes) or {}
        if self.last_meta is not None and not self._streaming:
            out["ctxcache"] = self.last_meta
        return out
