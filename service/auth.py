"""API keys → tenants (hashed at rest), and per-tenant rate limits (token buckets)."""

from __future__ import annotations

import hashlib
import secrets
import threading
import time

from sqlalchemy import select
from sqlalchemy.orm import Session

from ctxcache.semantic.models import ApiKey


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    def __init__(self, engine):
        self.engine = engine
        self._cache: dict[str, tuple[str, int] | None] = {}
        self._lock = threading.Lock()

    def create(self, tenant: str, name: str = "", rate_limit_per_min: int = 600) -> str:
        key = "cc-" + secrets.token_urlsafe(24)
        with Session(self.engine) as s:
            s.add(ApiKey(key_hash=hash_key(key), tenant=tenant, name=name,
                         rate_limit_per_min=rate_limit_per_min, created_at=time.time()))
            s.commit()
        return key

    def resolve(self, key: str) -> tuple[str, int] | None:
        """(tenant, rate limit per minute) of a valid key, else None."""
        h = hash_key(key)
        with self._lock:
            if h in self._cache:
                return self._cache[h]
        with Session(self.engine) as s:
            row = s.execute(select(ApiKey).where(ApiKey.key_hash == h,
                                                 ApiKey.revoked.is_(False))).scalar_one_or_none()
            out = (row.tenant, row.rate_limit_per_min) if row else None
        with self._lock:
            self._cache[h] = out
        return out

    def revoke_tenant(self, tenant: str) -> int:
        with Session(self.engine) as s:
            rows = s.execute(select(ApiKey).where(ApiKey.tenant == tenant)).scalars().all()
            for r in rows:
                r.revoked = True
            s.commit()
        with self._lock:
            self._cache.clear()
        return len(rows)


class RateLimiter:
    """Token bucket per tenant: ``limit`` requests per minute, bursts up to ``limit``."""

    def __init__(self):
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def allow(self, tenant: str, limit_per_min: int) -> tuple[bool, float]:
        """(allowed, seconds until the next token when refused)."""
        now = time.monotonic()
        rate = limit_per_min / 60.0
        with self._lock:
            tokens, last = self._buckets.get(tenant, (float(limit_per_min), now))
            tokens = min(float(limit_per_min), tokens + (now - last) * rate)
            if tokens >= 1.0:
                self._buckets[tenant] = (tokens - 1.0, now)
                return True, 0.0
            self._buckets[tenant] = (tokens, now)
            return False, (1.0 - tokens) / rate
