"""LangChain integration for the ctxcache gateway: chat model, LLM cache, RAG, agent teams."""

from langchain_ctxcache.cache import CtxCacheSemanticCache
from langchain_ctxcache.chat_models import ChatCtxCache
from langchain_ctxcache.rag import CtxCacheIngestor, CtxCacheRAG
from langchain_ctxcache.team import CtxCacheTeam

__all__ = ["ChatCtxCache", "CtxCacheIngestor", "CtxCacheRAG", "CtxCacheSemanticCache",
           "CtxCacheTeam"]
