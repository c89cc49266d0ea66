"""Storage tiers of the chunk KV store, fastest first: GPU, CPU (pinned), disk, Redis."""

from ctxcache.kv.tiers.base import Tier, TierUnavailableError
from ctxcache.kv.tiers.disk import DiskTier
from ctxcache.kv.tiers.memory import MemoryTier
from ctxcache.kv.tiers.redis import RedisTier

__all__ = ["DiskTier", "MemoryTier", "RedisTier", "Tier", "TierUnavailableError"]
