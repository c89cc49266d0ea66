"""The one interface every tier implements.

Tiers are dumb containers addressed by a storage key ``"<namespace>/<content key>"``; capacity,
eviction, promotion and tenancy are the store's job, so a tier only has to be correct (never
return a torn or corrupt entry) and to say how many bytes each entry takes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Iterator

from ctxcache.errors import CtxCacheError
from ctxcache.kv.entry import StoredEntry


class TierUnavailableError(CtxCacheError):
    """The tier's backing service (disk, Redis) cannot be reached right now."""


class Tier(ABC):
    name: str = "tier"
    persistent: bool = False  # survives a process restart

    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = int(capacity_bytes)

    @abstractmethod
    def get(self, skey: str) -> StoredEntry | None:
        """The entry, or None if absent. Raises CorruptEntryError after removing a bad entry."""

    @abstractmethod
    def put(self, skey: str, entry: StoredEntry) -> int:
        """Store atomically; return the bytes it occupies in this tier."""

    @abstractmethod
    def delete(self, skey: str) -> None: ...

    def has(self, skey: str) -> bool:
        """Present in this tier (written by this process or, for shared tiers, another)."""
        return self.get(skey) is not None

    @abstractmethod
    def scan(self) -> Iterator[tuple[str, int]]:
        """(storage key, bytes) of everything present — used to rebuild the index on start."""

    def close(self) -> None:  # pragma: no cover - default no-op
        pass
