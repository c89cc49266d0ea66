"""The tier stack a deployment's settings describe, built in one place: the gateway and
out-of-process users of the same tiers (the SGLang HiCache backend) must agree on it, or they
would not find each other's entries."""

from __future__ import annotations

from typing import Any

from ctxcache.kv.store import KVStore
from ctxcache.kv.tiers import DiskTier, MemoryTier, RedisTier, Tier


def build_tiers(settings: Any, *, device: str = "cpu", gpu_bytes: int | None = None,
                cpu_bytes: int | None = None) -> list[Tier]:
    """GPU (when ``device`` is CUDA and bytes are given) → CPU → disk → Redis, from the
    ``kv_*`` fields of ``settings`` (``ctxcache.service.settings.Settings``); a size of 0
    leaves a tier out."""
    gpu = settings.kv_gpu_bytes if gpu_bytes is None else gpu_bytes
    cpu = settings.kv_cpu_bytes if cpu_bytes is None else cpu_bytes
    tiers: list[Tier] = []
    if gpu and device.startswith("cuda"):
        tiers.append(MemoryTier(gpu, device))
    if cpu:
        tiers.append(MemoryTier(cpu, "cpu"))
    if settings.kv_disk_bytes:
        tiers.append(DiskTier(settings.data_dir / "kv", settings.kv_disk_bytes))
    if settings.redis_url:
        tiers.append(RedisTier(settings.redis_url, settings.kv_redis_bytes))
    return tiers


def build_store(settings: Any, **tier_options) -> KVStore:
    return KVStore(build_tiers(settings, **tier_options), eviction=settings.kv_eviction,
                   codec=settings.kv_codec)
