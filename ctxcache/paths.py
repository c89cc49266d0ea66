"""Storage paths built from names that come from requests (tenants, cache keys).

Every file the gateway writes under a tenant's name is placed by ``contained_path``: each part
must be one plain path segment, and the joined path must stay under its root, so no name (``..``,
``a/b``, an absolute path, a NUL byte) can write or delete outside the store it belongs to.
"""

from __future__ import annotations

import os
from pathlib import Path

from ctxcache.errors import InvalidInputError


def contained_path(root: str | os.PathLike, *parts: str) -> Path:
    base = Path(root)
    for p in parts:
        if not isinstance(p, str) or not p or p in (".", "..") or "/" in p or "\\" in p \
                or "\0" in p or os.sep in p:
            raise InvalidInputError(f"invalid storage name {p!r}: one plain path segment needed")
    path = base.joinpath(*parts)
    root_abs = os.path.abspath(base)
    if os.path.commonpath([root_abs, os.path.abspath(path)]) != root_abs:
        raise InvalidInputError(f"storage name {'/'.join(parts)!r} leaves its root")
    return path
