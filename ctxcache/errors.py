"""Typed exceptions of the library.

Every error a caller can cause by bad input derives from ``CtxCacheError`` *and* the matching
builtin (``ValueError``/``LookupError``) so generic handlers keep working, while the service layer
can map each type to a precise HTTP status.
"""


class CtxCacheError(Exception):
    """Base class of all ctxcache errors."""


class InvalidInputError(CtxCacheError, ValueError):
    """The caller passed something malformed: empty prompt, out-of-range token, bad parameter.

    ``param`` names the request field at fault, where one is (the API reports it)."""

    def __init__(self, message: str = "", param: str | None = None):
        super().__init__(message)
        self.param = param


class UnknownModelError(CtxCacheError, LookupError):
    """A model name that is neither a packaged model, a random-weight config nor a checkpoint dir."""


class ModelLoadError(CtxCacheError, RuntimeError):
    """The model exists but could not be loaded (missing files, unsupported architecture)."""


class KVMismatchError(CtxCacheError, ValueError):
    """Cached K/V that does not fit the request: wrong model shape, length/position mismatch."""


class UnknownChunkError(CtxCacheError, LookupError):
    """A prompt names a chunk cache key that this tenant cannot see (absent, evicted, foreign)."""


class ChunkMismatchError(KVMismatchError):
    """A cached chunk exists but was computed by another model or does not match its tokens."""
