"""The RAG runnable over a real retriever, and an agent team driven by LangGraph."""

import operator
from typing import Annotated, TypedDict

from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever

from langchain_ctxcache import CtxCacheIngestor, CtxCacheRAG, CtxCacheTeam

FACTS = [
    "Lake Baikal in Siberia is the deepest lake in the world, 1,642 metres at its deepest.",
    "Mount Everest, on the border of Nepal and China, is the highest mountain above sea level.",
    "The Nile and the Amazon are the two longest rivers on Earth.",
]


class KeywordRetriever(BaseRetriever):
    """Word-overlap ranking: a real (if simple) retriever, no embeddings needed."""

    docs: list[Document]
    k: int = 2

    def _get_relevant_documents(self, query, *, run_manager=None):
        words = set(query.lower().replace("?", "").split())
        scored = sorted(self.docs, key=lambda d: -len(words & set(d.page_content.lower()
                                                                   .split())))
        return scored[: self.k]


def test_rag_runnable_ingests_and_reuses(gateway_url):
    docs = [Document(page_content=t, metadata={"source": f"facts/{i}"})
            for i, t in enumerate(FACTS)]
    chain = CtxCacheRAG(retriever=KeywordRetriever(docs=docs), max_tokens=16,
                        semantic_cache=False)
    out = chain.invoke("Which lake is the deepest in the world?")
    assert "Baikal" in out["answer"]
    assert all("ctxcache_id" in d.metadata for d in out["documents"])
    assert out["ctxcache"]["reused_tokens"] > 0
    # pre-ingested documents keep their ids; the same question over them reuses chunk K/V
    ingested = CtxCacheIngestor(gateway_url).ingest(docs)
    assert [d.metadata["ctxcache_id"] for d in ingested if d.page_content == FACTS[0]] == \
        [d.metadata["ctxcache_id"] for d in out["documents"] if d.page_content == FACTS[0]]
    chain2 = CtxCacheRAG(retriever=KeywordRetriever(docs=ingested), max_tokens=16,
                         semantic_cache=False, strategy="cacheblend")
    again = chain2.invoke("Which is the highest mountain above sea level?")
    assert "Everest" in again["answer"] and again["ctxcache"]["strategy"] == "cacheblend"


async def test_rag_runnable_async(gateway_url):
    docs = [Document(page_content=t) for t in FACTS]
    out = await CtxCacheRAG(retriever=KeywordRetriever(docs=docs), max_tokens=16,
                            semantic_cache=False).ainvoke("Which lake is the deepest?")
    assert "Baikal" in out["answer"]


def test_langgraph_team_shares_context(gateway_url):
    from langgraph.graph import END, START, StateGraph

    class State(TypedDict):
        messages: Annotated[list, operator.add]

    team = CtxCacheTeam({
        "researcher": "You are a researcher. State one relevant fact in one sentence.",
        "critic": "You are a critic. Point out one weakness in one sentence.",
        "writer": "You are a writer. Write a one-sentence final answer."},
        shared_context="The team answers questions about geography.", max_tokens=24)
    team.post("user", "Question: which lake is the deepest in the world?")
    g = StateGraph(State)
    for name in ("researcher", "critic", "writer"):
        g.add_node(name, team.node(name))
    g.add_edge(START, "researcher")
    g.add_edge("researcher", "critic")
    g.add_edge("critic", "writer")
    g.add_edge("writer", END)
    out = g.compile().invoke({"messages": []})
    assert [a for a, _ in out["messages"]] == ["researcher", "critic", "writer"]
    assert all(text for _, text in out["messages"])
    # the writer read the user's message and two agents' answers, reusing their K/V
    assert team.last["ctxcache"]["reused_tokens"] > 0
    assert [m["agent"] for m in team.messages()] == ["user", "researcher", "critic", "writer"]
    team.close()
