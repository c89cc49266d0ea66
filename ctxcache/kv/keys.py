"""Content keys of chunk caches.

A chunk's K/V is a pure function of (model weights, dtype, RoPE settings, token ids, and — for
strategies that encode a chunk after a specific prefix — that prefix). The key hashes exactly
that with xxh3-128: the same text under another model, dtype or prefix can never collide, and the
same chunk sent by two tenants maps to one key (tenancy is enforced on top, see ``store.py``).
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import xxhash

from ctxcache.errors import InvalidInputError

_NAMESPACE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
PUBLIC_NAMESPACE = "_public"


def chunk_key(model_fingerprint: str, token_ids: Sequence[int], prefix_key: str | None = None) -> str:
    """xxh3-128 hex digest of model fingerprint + token ids (+ the prefix it was encoded under)."""
    if not model_fingerprint:
        raise InvalidInputError("model fingerprint must be non-empty")
    ids = np.asarray(token_ids, dtype=np.int64)
    if ids.size == 0:
        raise InvalidInputError("cannot key an empty chunk")
    h = xxhash.xxh3_128()
    h.update(b"ctxcache-chunk-v1\0")
    h.update(model_fingerprint.encode())
    h.update(b"\0prefix:")
    h.update((prefix_key or "").encode())
    h.update(b"\0tokens:")
    h.update(ids.tobytes())
    return h.hexdigest()


def check_namespace(namespace: str) -> str:
    if not isinstance(namespace, str) or not _NAMESPACE.match(namespace):
        raise InvalidInputError(
            f"invalid namespace {namespace!r}: use 1-64 characters from A-Z a-z 0-9 _ . -"
        )
    return namespace


def check_key(key: str) -> str:
    if not isinstance(key, str) or not re.fullmatch(r"[0-9a-f]{8,64}", key):
        raise InvalidInputError(f"invalid cache key {key!r}: expected a lowercase hex digest")
    return key
