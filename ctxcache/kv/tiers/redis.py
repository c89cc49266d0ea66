"""Redis tier: shared between gateway replicas.

A value is split into parts (Redis strings are capped and big values block the server), written
with a manifest in one MULTI/EXEC transaction, so readers see the whole new entry or none and two
writers of one key never interleave parts. Reads check the manifest's part count and the
payload's checksum (``serialize.unpack``); a bad entry is deleted and reported as corrupt.
A size hash per prefix lets a restarted store rebuild its index without reading values.
"""

from __future__ import annotations

import json
from typing import Iterator

from ctxcache.kv.entry import StoredEntry
from ctxcache.kv.serialize import CorruptEntryError, pack, unpack
from ctxcache.kv.tiers.base import Tier, TierUnavailableError


class RedisTier(Tier):
    name = "redis"
    persistent = True

    def __init__(self, url: str, capacity_bytes: int, prefix: str = "ctxcache:kv",
                 part_bytes: int = 8 << 20, client=None, socket_timeout: float = 5.0):
        super().__init__(capacity_bytes)
        import redis

        self._errors = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
        self.client = client or redis.Redis.from_url(
            url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout)
        self.prefix = prefix
        self.part_bytes = int(part_bytes)
        self.sizes_key = f"{prefix}:sizes"

    def _k(self, skey: str) -> str:
        return f"{self.prefix}:e:{skey}"

    def has(self, skey: str) -> bool:
        try:
            return bool(self.client.exists(self._k(skey) + ":m"))
        except self._errors as e:
            raise TierUnavailableError(f"redis unavailable: {e}") from e

    def get(self, skey: str) -> StoredEntry | None:
        base = self._k(skey)
        try:
            manifest = self.client.get(base + ":m")
            if manifest is None:
                return None
            m = json.loads(manifest)
            parts = self.client.mget([f"{base}:p:{i}" for i in range(m["parts"])])
        except self._errors as e:
            raise TierUnavailableError(f"redis unavailable: {e}") from e
        try:
            if any(p is None for p in parts):
                raise CorruptEntryError("missing parts")
            buf = bytearray(sum(len(p) for p in parts))  # one copy; tensors become views of it
            off = 0
            for p in parts:
                buf[off: off + len(p)] = p
                off += len(p)
            return unpack(buf)
        except (CorruptEntryError, ValueError, KeyError) as e:
            self.delete(skey)
            raise CorruptEntryError(str(e)) from e

    def put(self, skey: str, entry: StoredEntry) -> int:
        data = memoryview(pack(entry))
        base = self._k(skey)
        n = max(1, -(-len(data) // self.part_bytes))
        try:
            old = self.client.get(base + ":m")
            pipe = self.client.pipeline(transaction=True)
            if old is not None:  # drop parts a longer old value may have had
                for i in range(n, json.loads(old)["parts"]):
                    pipe.delete(f"{base}:p:{i}")
            for i in range(n):
                pipe.set(f"{base}:p:{i}", data[i * self.part_bytes:(i + 1) * self.part_bytes])
            pipe.set(base + ":m", json.dumps({"parts": n, "bytes": len(data)}))
            pipe.hset(self.sizes_key, skey, len(data))
            pipe.execute()
        except self._errors as e:
            raise TierUnavailableError(f"redis unavailable: {e}") from e
        return len(data)

    def delete(self, skey: str) -> None:
        base = self._k(skey)
        try:
            manifest = self.client.get(base + ":m")
            n = json.loads(manifest)["parts"] if manifest else 0
            pipe = self.client.pipeline(transaction=True)
            pipe.delete(base + ":m", *[f"{base}:p:{i}" for i in range(n)])
            pipe.hdel(self.sizes_key, skey)
            pipe.execute()
        except self._errors as e:
            raise TierUnavailableError(f"redis unavailable: {e}") from e
        except (ValueError, KeyError):
            self.client.delete(base + ":m")

    def scan(self) -> Iterator[tuple[str, int]]:
        try:
            sizes = self.client.hgetall(self.sizes_key)
        except self._errors as e:
            raise TierUnavailableError(f"redis unavailable: {e}") from e
        for k, v in sizes.items():
            yield k.decode(), int(v)

    def clear(self) -> None:
        """Remove everything under this tier's prefix (tests, admin flush)."""
        try:
            keys = list(self.client.scan_iter(match=f"{self.prefix}:*", count=1000))
            for i in range(0, len(keys), 500):
                self.client.delete(*keys[i:i + 500])
        except self._errors as e:
            raise TierUnavailableError(f"redis unavailable: {e}") from e
