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

# a namespace is one path segment of the disk tier: never "." / ".." (no leading dot)
_NAMESPACE = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,63}$")
PUBLIC_NAMESPACE = "_public"
# tenant names a key may not be issued for: the gateway's own namespaces (public documents,
# the admin key's, the unauthenticated one) and names that read as one of them
RESERVED_TENANTS = frozenset({PUBLIC_NAMESPACE, "public", "admin", "default", "system",
                              "root", "anonymous"})
_TENANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


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


def check_tenant_name(name: str) -> str:
    """A name an API key may be issued for: starts with a letter or digit, then letters,
    digits, ``_ . -`` (at most 64), and none of ``RESERVED_TENANTS`` in any letter case."""
    if not isinstance(name, str) or not _TENANT.match(name) or ".." in name:
        raise InvalidInputError(
            f"invalid tenant name {name!r}: 1-64 characters from A-Z a-z 0-9 _ . -, starting "
            "with a letter or digit")
    if name.lower() in RESERVED_TENANTS:
        raise InvalidInputError(f"tenant name {name!r} is reserved; reserved: "
                                f"{', '.join(sorted(RESERVED_TENANTS))}")
    return name


def check_key(key: str) -> str:
    if not isinstance(key, str) or not re.fullmatch(r"[0-9a-f]{8,64}", key):
        raise InvalidInputError(f"invalid cache key {key!r}: expected a lowercase hex digest")
    return key
