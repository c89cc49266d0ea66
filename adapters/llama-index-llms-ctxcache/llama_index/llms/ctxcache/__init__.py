from llama_index.llms.ctxcache.base import CtxCache
from llama_index.llms.ctxcache.synthesizer import CtxCacheSynthesizer

__all__ = ["CtxCache", "CtxCacheSynthesizer"]
