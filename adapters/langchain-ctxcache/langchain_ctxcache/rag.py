"""Retrieval → ctxcache: ingest LangChain ``Document``s into the gateway's KV store, and a RAG
runnable that answers over retrieved documents by sending their ids, so the gateway reuses
their chunk K/V instead of prefilling the same text again for every question.

    chain = CtxCacheRAG(retriever=my_retriever)      # any LangChain retriever
    chain.invoke("Which lake is the deepest?")      # {"answer", "documents", "ctxcache"}
"""

from __future__ import annotations

from typing import Any, Sequence

from ctxcache_client import AsyncClient, Client
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import RunnableConfig, RunnableSerializable
from pydantic import ConfigDict, Field, PrivateAttr

ID_KEY = "ctxcache_id"  # metadata key the gateway's document id is kept under


def _payload(docs: Sequence[Document]) -> list[dict]:
    out = []
    for d in docs:
        meta = {k: v for k, v in d.metadata.items()
                if k != ID_KEY and isinstance(v, (str, int, float, bool))}
        out.append({"text": d.page_content, "title": str(d.metadata.get("title") or "")
                    or None, "metadata": meta})
    return out


def _with_ids(docs: Sequence[Document], rows: list[dict]) -> list[Document]:
    return [Document(page_content=d.page_content, metadata={**d.metadata, ID_KEY: r["id"]},
                     id=d.id) for d, r in zip(docs, rows)]


class CtxCacheIngestor:
    """Ingest documents once (the gateway dedups by content hash): chunked, prefilled and
    stored per chunk. Returns the documents with ``metadata["ctxcache_id"]`` set — put them
    in your vector store so retrieval hands back ids the gateway knows."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None,
                 public: bool = False):
        self.client = Client(base_url, api_key)
        self.aclient = AsyncClient(base_url, api_key)
        self.public = public

    def ingest(self, docs: Sequence[Document], batch: int = 64) -> list[Document]:
        out: list[Document] = []
        for i in range(0, len(docs), batch):
            part = docs[i:i + batch]
            out += _with_ids(part, self.client.add_documents(_payload(part), self.public))
        return out

    async def aingest(self, docs: Sequence[Document], batch: int = 64) -> list[Document]:
        out: list[Document] = []
        for i in range(0, len(docs), batch):
            part = docs[i:i + batch]
            out += _with_ids(part, await self.aclient.add_documents(_payload(part),
                                                                    self.public))
        return out


class CtxCacheRAG(RunnableSerializable[str, dict]):
    """question → retrieve → ``/v1/rag`` with the documents' ids (ingesting the ones the
    gateway has not seen) → ``{"answer", "documents", "ctxcache"}``."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    retriever: BaseRetriever
    base_url: str | None = None
    api_key: str | None = None
    strategy: str | None = None
    system: str | None = None
    max_tokens: int = 256
    semantic_cache: bool = True
    extra: dict[str, Any] = Field(default_factory=dict)
    _ingestor: CtxCacheIngestor = PrivateAttr()

    def model_post_init(self, __context: Any) -> None:
        self._ingestor = CtxCacheIngestor(self.base_url, self.api_key)

    def _request(self, question: str, docs: list[Document]) -> dict:
        return {"document_ids": [d.metadata[ID_KEY] for d in docs], "system": self.system,
                "strategy": self.strategy, "max_tokens": self.max_tokens,
                "cache": self.semantic_cache, **self.extra}

    @staticmethod
    def _result(res: dict, docs: list[Document]) -> dict:
        return {"answer": res["answer"], "documents": docs, "ctxcache": res.get("ctxcache"),
                "usage": res.get("usage")}

    def invoke(self, input: str, config: RunnableConfig | None = None, **kwargs: Any) -> dict:
        docs = self.retriever.invoke(input, config)
        missing = [d for d in docs if ID_KEY not in d.metadata]
        if missing:
            known = iter(self._ingestor.ingest(missing))
            docs = [d if ID_KEY in d.metadata else next(known) for d in docs]
        res = self._ingestor.client.rag(input, **self._request(input, docs))
        return self._result(res, docs)

    async def ainvoke(self, input: str, config: RunnableConfig | None = None,
                      **kwargs: Any) -> dict:
        docs = await self.retriever.ainvoke(input, config)
        missing = [d for d in docs if ID_KEY not in d.metadata]
        if missing:
            known = iter(await self._ingestor.aingest(missing))
            docs = [d if ID_KEY in d.metadata else next(known) for d in docs]
        res = await self._ingestor.aclient.rag(input, **self._request(input, docs))
        return self._result(res, docs)
