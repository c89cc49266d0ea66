"""A LangChain app on the gateway: a prompt | chat model chain, the gateway's semantic cache as
LangChain's LLM cache, and a RAG runnable whose retrieved documents' KV is reused.

    ctxcache serve &
    pip install -e adapters/ctxcache-client -e adapters/langchain-ctxcache
    python examples/langchain_chain.py
"""

from langchain_core.documents import Document
from langchain_core.globals import set_llm_cache
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.retrievers import BaseRetriever

from langchain_ctxcache import ChatCtxCache, CtxCacheRAG, CtxCacheSemanticCache

llm = ChatCtxCache(max_tokens=48)  # CTXCACHE_BASE_URL / CTXCACHE_URL, default 127.0.0.1:8000
chain = ChatPromptTemplate.from_messages(
    [("system", "Answer in one short sentence."), ("human", "{question}")]) | llm
msg = chain.invoke({"question": "What is the capital of France?"})
print("chain:", msg.content, "|", msg.response_metadata["ctxcache"]["cache"])

cache = CtxCacheSemanticCache()
set_llm_cache(cache)  # paraphrases of earlier questions are answered without a model call
for q in ("How many legs does a spider have?", "how many legs do spiders have"):
    print("cached llm:", llm.invoke(q).content)
cache.clear()
set_llm_cache(None)

FACTS = ["The Danube rises in the Black Forest in Germany and flows into the Black Sea.",
         "The Rhine begins in the Swiss Alps and flows into the North Sea.",
         "The Seine flows through Paris into the English Channel."]


class Overlap(BaseRetriever):
    """Word-overlap retrieval (any LangChain retriever works the same way)."""

    docs: list[Document]

    def _get_relevant_documents(self, query, *, run_manager=None):
        words = set(query.lower().split())
        return sorted(self.docs, key=lambda d: -len(words & set(d.page_content.lower()
                                                               .split())))[:2]


rag = CtxCacheRAG(retriever=Overlap(docs=[Document(page_content=t) for t in FACTS]),
                  max_tokens=48)
for q in ("Where does the Danube rise?", "Into which sea does the Rhine flow?"):
    out = rag.invoke(q)
    meta = out["ctxcache"]
    print(f"rag: {out['answer'].strip()} | {meta['strategy']}, reused {meta['reused_tokens']} "
          f"prompt tokens")
