"""``CtxCacheHiCacheStorage``: SGLang's HiCache L3 storage on ctxcache's KV store.

SGLang's hierarchical cache keeps KV pages in GPU memory (L1), host memory (L2) and an optional
storage backend (L3) that it talks to through ``HiCacheStorage``: pages are addressed by a
hash key of their token prefix and moved as flat tensors. This backend stores those pages in
ctxcache's tiers — CPU memory, local disk, Redis — with ctxcache's eviction and accounting, so
an SGLang deployment and ctxcache gateways share one KV store (pages written by one SGLang
instance are found by another through Redis).

Load it without changing SGLang, by module path::

    python -m sglang.launch_server ... --enable-hierarchical-cache \\
      --hicache-storage-backend dynamic \\
      --hicache-storage-backend-extra-config '{"backend_name": "ctxcache",
        "module_path": "sglang_ctxcache.storage", "class_name": "CtxCacheHiCacheStorage",
        "redis_url": "redis://127.0.0.1:6379/0"}'

Options in the extra config (defaults: the ``CTXCACHE_*`` settings a gateway reads):
``data_dir``, ``disk_bytes``, ``cpu_bytes``, ``redis_url``, ``redis_bytes``, ``namespace``
(the ctxcache tenant the pages belong to, default ``sglang``).

Keys: SGLang's page key plus this worker's model / tensor-parallel rank (unless MLA, whose
pages are identical across ranks) / pipeline rank, hashed to a ctxcache content key — so
different models or shardings never read each other's pages.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, List, Optional

import torch
from sglang.srt.mem_cache.hicache_storage import (
    HiCacheStorage, HiCacheStorageConfig, HiCacheStorageExtraInfo, PoolTransfer,
    PoolTransferResult,
)

from ctxcache.kv.config import build_store
from ctxcache.kv.store import KVStore

log = logging.getLogger(__name__)
KV_POOL = "kv"


def _suffix(cfg: HiCacheStorageConfig) -> str:
    model = (cfg.model_name or "").replace("/", "-")
    out = f"m={model}"
    if not cfg.is_mla_model:
        out += f"|tp={cfg.tp_rank}/{cfg.tp_size}"
    if cfg.pp_size > 1:
        out += f"|pp={cfg.pp_rank}/{cfg.pp_size}"
    if getattr(cfg, "attn_cp_size", 1) > 1:
        out += f"|cp={cfg.attn_cp_rank}/{cfg.attn_cp_size}"
    return out


class CtxCacheHiCacheStorage(HiCacheStorage):
    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: Any = None,
                 store: KVStore | None = None):
        extra = dict(storage_config.extra_config or {})
        self.config = storage_config
        self.namespace = str(extra.get("namespace", "sglang"))
        self.suffix = _suffix(storage_config)
        self.store = store or self._build_store(extra)
        self.model = f"sglang:{storage_config.model_name or ''}"

    @staticmethod
    def _build_store(extra: dict) -> KVStore:
        from ctxcache.service.settings import Settings

        over = {k: extra[src] for k, src in (
            ("data_dir", "data_dir"), ("kv_disk_bytes", "disk_bytes"),
            ("kv_cpu_bytes", "cpu_bytes"), ("redis_url", "redis_url"),
            ("kv_redis_bytes", "redis_bytes")) if src in extra}
        if "data_dir" in over:
            over["data_dir"] = Path(over["data_dir"])
        settings = Settings(**over)
        # SGLang's own host memory is the L2 above us: a small CPU tier only absorbs bursts
        return build_store(settings, device="cpu", gpu_bytes=0,
                           cpu_bytes=int(extra.get("cpu_bytes", 256 << 20)))

    # ------------------------------------------------------------------ keys
    def _key(self, key: str, pool: Optional[str] = None) -> str:
        name = key if pool in (None, KV_POOL, "__default__") else f"{key}.{pool}"
        return hashlib.blake2b(f"{name}|{self.suffix}".encode(), digest_size=16).hexdigest()

    # ------------------------------------------------------------------ single pages
    def get(self, key: str, target_location: Optional[Any] = None,
            target_sizes: Optional[Any] = None) -> torch.Tensor | None:
        return self._get(self._key(key), target_location)

    def _get(self, ckey: str, target: Optional[torch.Tensor]) -> torch.Tensor | None:
        try:
            found = self.store.get_blob(ckey, self.namespace)
        except Exception:  # noqa: BLE001 - a storage failure is a miss to SGLang, not a crash
            log.exception("ctxcache get failed")
            return None
        if found is None:
            return None
        data, meta = found
        if target is None:
            dtype = getattr(torch, meta.get("dtype", "uint8"))
            return data.view(dtype).reshape(meta.get("shape", [-1])).clone()
        dst = target.view(-1).view(torch.uint8) if target.is_contiguous() else None
        if dst is None or dst.numel() != data.numel():
            log.warning("ctxcache page of %d bytes does not fit a target of %d bytes",
                        data.numel(), target.numel() * target.element_size())
            return None
        dst.copy_(data)
        return target

    def batch_get(self, keys: List[str], target_locations: Optional[Any] = None,
                  target_sizes: Optional[Any] = None) -> List[torch.Tensor | None]:
        targets = target_locations or [None] * len(keys)
        return [self.get(k, t) for k, t in zip(keys, targets)]

    def set(self, key: str, value: Optional[Any] = None, target_location: Optional[Any] = None,
            target_sizes: Optional[Any] = None) -> bool:
        page = value if value is not None else target_location
        return self._set(self._key(key), page)

    def _set(self, ckey: str, page: Optional[torch.Tensor]) -> bool:
        if page is None:
            return False
        if self.store.contains(ckey, self.namespace):
            return True  # content-addressed: same key, same bytes
        try:
            return self.store.put_blob(ckey, page, namespace=self.namespace, model=self.model)
        except Exception:  # noqa: BLE001
            log.exception("ctxcache set failed")
            return False

    def batch_set(self, keys: List[str], values: Optional[Any] = None,
                  target_locations: Optional[Any] = None,
                  target_sizes: Optional[Any] = None) -> bool:
        pages = values if values is not None else target_locations
        return all([self.set(k, v) for k, v in zip(keys, pages)])

    def exists(self, key: str) -> bool:
        return self.store.contains(self._key(key), self.namespace, probe=True)

    def batch_exists(self, keys: List[str],
                     extra_info: Optional[HiCacheStorageExtraInfo] = None) -> int:
        for i, k in enumerate(keys):
            if not self.exists(k):
                return i
        return len(keys)

    # ------------------------------------------------------------------ zero-copy (v1)
    def batch_get_v1(self, keys: List[str], host_indices: torch.Tensor,
                     extra_info: Optional[HiCacheStorageExtraInfo] = None) -> List[bool]:
        return self._pages_in(self.mem_pool_host, keys, host_indices, None)

    def batch_set_v1(self, keys: List[str], host_indices: torch.Tensor,
                     extra_info: Optional[HiCacheStorageExtraInfo] = None) -> List[bool]:
        return self._pages_out(self.mem_pool_host, keys, host_indices, None)

    def _offsets(self, pool, keys: List[str], host_indices: torch.Tensor) -> List[int] | None:
        page = getattr(pool, "page_size", 1) or 1
        if host_indices is None or host_indices.numel() != len(keys) * page:
            log.error("host_indices hold %s slots for %d pages of %d",
                      None if host_indices is None else host_indices.numel(), len(keys), page)
            return None
        return host_indices[::page].tolist()

    def _pages_in(self, pool, keys, host_indices, pool_name) -> List[bool]:
        offsets = self._offsets(pool, keys, host_indices)
        if offsets is None:
            return [False] * len(keys)
        ok = []
        for k, off in zip(keys, offsets):
            page = self._get(self._key(k, pool_name), pool.get_dummy_flat_data_page())
            if page is not None:
                pool.set_from_flat_data_page(off, page)
            ok.append(page is not None)
        return ok

    def _pages_out(self, pool, keys, host_indices, pool_name) -> List[bool]:
        offsets = self._offsets(pool, keys, host_indices)
        if offsets is None:
            return [False] * len(keys)
        return [self._set(self._key(k, pool_name), pool.get_data_page(off, flat=True))
                for k, off in zip(keys, offsets)]

    # ------------------------------------------------------------------ multi-pool (v2)
    def batch_exists_v2(self, keys: List[str],
                        pool_transfers: Optional[List[PoolTransfer]] = None,
                        extra_info: Optional[HiCacheStorageExtraInfo] = None
                        ) -> PoolTransferResult:
        """Longest run of pages present from the start; each extra pool's ``all_pages`` or
        ``trailing_pages`` policy can only shorten it."""
        kv = self.batch_exists(keys)
        hits = {KV_POOL: kv} if kv else {}
        final = kv
        for t in pool_transfers or []:
            if final == 0:
                break
            present = [self.store.contains(self._key(k, str(t.name)), self.namespace,
                                           probe=True) for k in keys[:kv]]
            if str(getattr(t.hit_policy, "value", t.hit_policy)) == "all_pages":
                bound = present.index(False) if False in present else kv
            else:
                trailing = max(1, len(t.keys) if t.keys else 1)
                bound = next((n for n in range(kv, 0, -1)
                              if all(present[max(0, n - trailing):n])), 0)
            if bound:
                hits[str(t.name)] = bound
            final = min(final, bound)
        return PoolTransferResult(final, hits)

    def _v2(self, transfers: List[PoolTransfer], fn) -> dict[str, List[bool]]:
        out: dict[str, List[bool]] = {}
        pools = getattr(self, "registered_pools", {})
        for t in transfers:
            name = str(t.name)
            pool = pools.get(t.name) or pools.get(name)
            keys = t.keys or []
            if pool is None:
                log.error("no host pool registered as %s", name)
                out[name] = [False] * len(keys)
                continue
            out[name] = fn(pool, keys, t.host_indices, name)
        return out

    def batch_get_v2(self, transfers: List[PoolTransfer],
                     extra_info: Optional[HiCacheStorageExtraInfo] = None
                     ) -> dict[str, List[bool]]:
        return self._v2(transfers, self._pages_in)

    def batch_set_v2(self, transfers: List[PoolTransfer],
                     extra_info: Optional[HiCacheStorageExtraInfo] = None
                     ) -> dict[str, List[bool]]:
        return self._v2(transfers, self._pages_out)

    # ------------------------------------------------------------------ housekeeping
    def clear(self) -> bool:
        self.store.delete_namespace(self.namespace)
        return True

    def get_stats(self):
        return self.store.stats()
