"""SGLang HiCache storage backend on ctxcache's KV store tiers."""

from sglang_ctxcache.storage import CtxCacheHiCacheStorage

__all__ = ["CtxCacheHiCacheStorage"]
