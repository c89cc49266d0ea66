"""ctxcache: a context-caching gateway for RAG apps and agent teams.

Two levels of reuse: a category-aware semantic cache of answers, and a chunk-level KV cache
that lets prompts built from known chunks (in any order) skip most of their prefill.
The core library is importable without the web service's dependencies.
"""

from ctxcache._shadow import settle_kernels_name

settle_kernels_name()

from ctxcache.errors import (  # noqa: E402
    ChunkMismatchError,
    CtxCacheError,
    InvalidInputError,
    KVMismatchError,
    ModelLoadError,
    UnknownChunkError,
    UnknownModelError,
)

__version__ = "0.1.0"

__all__ = [
    "ChunkMismatchError",
    "CtxCacheError",
    "InvalidInputError",
    "KVMismatchError",
    "ModelLoadError",
    "UnknownChunkError",
    "UnknownModelError",
    "__version__",
]
