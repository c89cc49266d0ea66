"""The chunk KV store: tiers behind one interface, with eviction, promotion and tenancy.

Flow of a ``put``: content key → admission → encode (codec) → insert into the top tier and, with
``write_through``, into every persistent tier (so ingested documents survive a restart). Inserting
into a full tier evicts by the tier's policy; a victim is *demoted* to the next tier when that tier
does not have it yet, and dropped from the last one.

Flow of a ``get``: the tenant's namespace, then the public one; tiers fastest first; a hit below
the top is *promoted* upwards. A corrupt entry is removed, counted and skipped (a miss, never
used); a tier whose backing service fails is marked down for a back-off period, counted and
skipped, and the store keeps serving from the other tiers.

Index and policies live in memory (one per tier) behind one lock; tier I/O runs outside it so
prefetch threads and request threads overlap.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from ctxcache.engine.kvcache import KVCache
from ctxcache.errors import InvalidInputError
from ctxcache.kv.codec import get_codec
from ctxcache.kv.entry import BLOB_DTYPE, ChunkEntry, EntryMeta, StoredEntry, dtype_name
from ctxcache.kv.eviction import AdmissionPolicy, EvictionPolicy, make_policy
from ctxcache.kv.keys import PUBLIC_NAMESPACE, check_key, check_namespace, chunk_key
from ctxcache.kv.serialize import CorruptEntryError
from ctxcache.kv.tiers.base import Tier, TierUnavailableError
from ctxcache.kv.writebehind import WriteBehind

SIZE_SLACK = 4096  # serialization overhead allowed for when checking capacity before a write


@dataclass
class TierState:
    tier: Tier
    policy: EvictionPolicy
    sizes: dict[str, int] = field(default_factory=dict)
    used: int = 0
    hits: int = 0
    evictions: int = 0
    errors: int = 0
    down_until: float = 0.0
    last_error: str = ""

    @property
    def healthy(self) -> bool:
        return time.monotonic() >= self.down_until


class KVStore(WriteBehind):
    def __init__(
        self,
        tiers: Sequence[Tier],
        *,
        eviction: str = "gdsf",
        admission: AdmissionPolicy | None = None,
        codec: str = "raw",
        write_through: bool = True,
        promote: bool = True,
        retry_after_s: float = 5.0,
        prefetch_workers: int = 2,
    ):
        if not tiers:
            raise InvalidInputError("a KV store needs at least one tier")
        get_codec(codec)  # validate early
        self.codec = codec
        self.eviction = eviction
        self.admission = admission or AdmissionPolicy()
        self.write_through = write_through
        self.promote = promote
        self.retry_after_s = retry_after_s
        self.tiers = [TierState(t, make_policy(eviction)) for t in tiers]
        self._lock = threading.RLock()
        self._pool = ThreadPoolExecutor(max_workers=prefetch_workers,
                                        thread_name_prefix="kv-prefetch")
        self._pending: dict[str, Future] = {}  # write-behind puts not yet visible in a tier
        # "<ns>/<content key>" → the key of the same tokens stored encoded after a prefix
        # (newest), so a prompt with another prefix still finds them (in memory: a hint)
        self._variants: OrderedDict[str, str] = OrderedDict()
        self.max_variants = 1 << 18
        # its own thread: a prefetch waiting on a pending write must never block that write
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-writer")
        self.counters = {"puts": 0, "rejected": 0, "hits": 0, "misses": 0, "corrupt": 0,
                         "promotions": 0, "demotions": 0, "tier_errors": 0}
        for st in self.tiers:
            if st.tier.persistent:
                self._rebuild_index(st)

    # ------------------------------------------------------------------ bookkeeping
    def _rebuild_index(self, st: TierState) -> None:
        try:
            for skey, size in st.tier.scan():
                st.sizes[skey] = size
                st.used += size
                st.policy.insert(skey, size, float(size))  # cost unknown until used: neutral
        except TierUnavailableError as e:
            self._tier_failed(st, e)

    def _tier_failed(self, st: TierState, e: Exception) -> None:
        with self._lock:
            st.errors += 1
            st.last_error = str(e)
            st.down_until = time.monotonic() + self.retry_after_s
            self.counters["tier_errors"] += 1

    def _forget(self, st: TierState, skey: str) -> None:
        with self._lock:
            size = st.sizes.pop(skey, None)
            if size is not None:
                st.used -= size
                st.policy.remove(skey)

    # ------------------------------------------------------------------ insert / evict
    def _insert(self, level: int, skey: str, entry: StoredEntry) -> bool:
        st = self.tiers[level]
        if not st.healthy:
            return False
        need = entry.nbytes + SIZE_SLACK
        if need > st.tier.capacity_bytes:
            return False
        victims: list[tuple[str, int]] = []
        with self._lock:
            if skey in st.sizes:
                st.policy.touch(skey)
                return True
            while st.used + need > st.tier.capacity_bytes:
                v = st.policy.victim()
                if v is None:
                    break
                victims.append((v, st.sizes.get(v, 0)))
                st.used -= st.sizes.pop(v, 0)
                st.policy.remove(v)
                st.evictions += 1
            # reserve the space now so concurrent inserts cannot overshoot the capacity
            st.sizes[skey] = need
            st.used += need
            st.policy.insert(skey, need, entry.meta.recompute_cost)
        for v, _ in victims:
            self._demote(level, v)
        try:
            size = st.tier.put(skey, entry)
        except TierUnavailableError as e:
            self._forget(st, skey)
            self._tier_failed(st, e)
            return False
        with self._lock:
            if skey in st.sizes:
                st.used += size - st.sizes[skey]
                st.sizes[skey] = size
        return True

    def _demote(self, level: int, skey: str) -> None:
        st = self.tiers[level]
        nxt = level + 1
        try:
            entry = st.tier.get(skey) if nxt < len(self.tiers) else None
            if entry is not None and skey not in self.tiers[nxt].sizes:
                if self._insert(nxt, skey, entry):
                    with self._lock:
                        self.counters["demotions"] += 1
            st.tier.delete(skey)
        except CorruptEntryError:
            with self._lock:
                self.counters["corrupt"] += 1
        except TierUnavailableError as e:
            self._tier_failed(st, e)

    # ------------------------------------------------------------------ public API
    def key_for(self, model: str, token_ids: Sequence[int] | Tensor,
                prefix_key: str | None = None) -> str:
        ids = token_ids.tolist() if torch.is_tensor(token_ids) else list(token_ids)
        return chunk_key(model, ids, prefix_key)

    def put(
        self,
        kv: KVCache,
        token_ids: Sequence[int] | Tensor,
        *,
        model: str,
        namespace: str = "default",
        prefix_key: str | None = None,
        stats: dict[str, Tensor] | None = None,
        recompute_cost: float | None = None,
        public: bool = False,
        force: bool = False,
        extra: dict | None = None,
    ) -> str | None:
        """Store a chunk's K/V; return its content key, or None if admission declined it."""
        check_namespace(namespace)
        ids = torch.as_tensor(token_ids if not torch.is_tensor(token_ids) else token_ids.cpu(),
                              dtype=torch.int64).reshape(-1)
        if ids.numel() != kv.num_tokens:
            raise InvalidInputError(f"{ids.numel()} token ids for a KV of {kv.num_tokens} tokens")
        key = self.key_for(model, ids, prefix_key)
        with self._lock:
            admitted = force or self.admission.admit(key, ids.numel())
            if not admitted:
                self.counters["rejected"] += 1
                return None
            self.counters["puts"] += 1
        ns = PUBLIC_NAMESPACE if public else namespace
        meta = EntryMeta(key=key, namespace=ns, model=model, num_tokens=ids.numel(),
                         dtype=dtype_name(kv.k.dtype), codec=self.codec,
                         recompute_cost=float(recompute_cost if recompute_cost else ids.numel()),
                         prefix_key=prefix_key, public=public, extra=extra or {},
                         first_position=int(kv.positions[0]) if kv.num_tokens else 0)
        self._store(f"{ns}/{key}", StoredEntry.encode(meta, kv, ids, stats))
        if prefix_key is not None:
            plain = f"{ns}/{self.key_for(model, ids)}"
            with self._lock:
                self._variants[plain] = key
                self._variants.move_to_end(plain)
                while len(self._variants) > self.max_variants:
                    self._variants.popitem(last=False)
        return key

    def variant_of(self, key: str, namespace: str = "default") -> str | None:
        """The key under which the tokens of content key ``key`` are stored encoded after some
        prefix (the newest such entry still held), or None. A chunk ingested after one system
        prompt is then found by a prompt with another: position-independent strategies place
        and repair it like any other cached chunk."""
        with self._lock:
            for ns in (namespace, PUBLIC_NAMESPACE):
                v = self._variants.get(f"{ns}/{key}")
                if v is not None and any(f"{ns}/{v}" in st.sizes for st in self.tiers):
                    return v
        return None

    def _store(self, skey: str, entry: StoredEntry) -> bool:
        """Top tier (+ persistent tiers when writing through); else the first that takes it."""
        stored = False
        for level, st in enumerate(self.tiers):
            if level == 0 or (self.write_through and st.tier.persistent):
                stored |= self._insert(level, skey, entry)
        if not stored:  # top tier full or down: fall through to the first tier that takes it
            for level in range(1, len(self.tiers)):
                if self._insert(level, skey, entry):
                    return True
        return stored

    # ------------------------------------------------------------------ opaque blobs
    def put_blob(self, key: str, data: Tensor, *, namespace: str = "default",
                 model: str = "blob", extra: dict | None = None) -> bool:
        """Store opaque bytes (e.g. a page of another engine's KV pool) under a caller-chosen
        hex key, in the same tiers, with the same eviction and tenancy as chunk K/V — so an
        external engine shares our disk / Redis tiers. Returns whether some tier took it."""
        check_key(key)
        check_namespace(namespace)
        u8 = data.detach().contiguous().reshape(-1).view(torch.uint8).cpu()
        meta = EntryMeta(key=key, namespace=namespace, model=model, num_tokens=0,
                         dtype=BLOB_DTYPE, codec="raw", recompute_cost=float(u8.numel()),
                         extra={"dtype": str(data.dtype).removeprefix("torch."),
                                "shape": list(data.shape), **(extra or {})})
        with self._lock:
            self.counters["puts"] += 1
        return self._store(f"{namespace}/{key}", StoredEntry(meta, {"blob": u8}))

    def get_blob(self, key: str, namespace: str = "default") -> tuple[Tensor, dict] | None:
        """(the bytes as a flat uint8 tensor, the metadata given at put) or None."""
        check_key(key)
        check_namespace(namespace)
        entry = self._lookup(f"{namespace}/{key}", None, raw=True)
        if entry is None or entry.meta.dtype != BLOB_DTYPE:
            with self._lock:
                self.counters["misses"] += 1
            return None
        return entry.tensors["blob"], entry.meta.extra

    def _wait_pending(self, skey: str) -> None:
        fut = self._pending.get(skey)
        if fut is not None:
            fut.result()  # read-your-writes: a lookup never misses a put still in flight

    def _lookup(self, skey: str, device, raw: bool = False):
        self._wait_pending(skey)
        for level, st in enumerate(self.tiers):
            if not st.healthy:
                continue
            if skey not in st.sizes and not st.tier.persistent:
                continue
            try:
                entry = st.tier.get(skey)
            except CorruptEntryError:
                self._forget(st, skey)
                with self._lock:
                    self.counters["corrupt"] += 1
                continue
            except TierUnavailableError as e:
                self._tier_failed(st, e)
                continue
            if entry is None:
                self._forget(st, skey)  # gone underneath us (another replica evicted it)
                continue
            with self._lock:
                st.hits += 1
                self.counters["hits"] += 1
                if skey in st.sizes:
                    st.policy.touch(skey)
                else:  # written by another replica sharing this tier: adopt it in the index
                    size = entry.nbytes
                    st.sizes[skey] = size
                    st.used += size
                    st.policy.insert(skey, size, entry.meta.recompute_cost)
            if self.promote and level > 0:
                for up in range(level):
                    if self._insert(up, skey, entry):
                        with self._lock:
                            self.counters["promotions"] += 1
            return entry if raw else entry.decode(device)
        return None

    def put_many(self, items: Sequence[dict], **common) -> list[str | None]:
        """Store several chunks: each item holds ``kv`` and ``token_ids`` (+ per-item options);
        ``common`` options (model, namespace, …) apply to all."""
        return [self.put(it["kv"], it["token_ids"], **{**common, **{
            k: v for k, v in it.items() if k not in ("kv", "token_ids")}}) for it in items]

    def get(self, key: str, namespace: str = "default",
            device: torch.device | str | None = None) -> ChunkEntry | None:
        """The chunk under ``key`` visible to ``namespace`` (its own, then public), or None."""
        check_key(key)
        check_namespace(namespace)
        for ns in (namespace, PUBLIC_NAMESPACE) if namespace != PUBLIC_NAMESPACE else (namespace,):
            hit = self._lookup(f"{ns}/{key}", device)
            if hit is not None:
                return hit
        with self._lock:
            self.counters["misses"] += 1
        return None

    def get_many(self, keys: Sequence[str], namespace: str = "default",
                 device: torch.device | str | None = None) -> list[ChunkEntry | None]:
        futures = self.prefetch(keys, namespace, device)
        return [f.result() for f in futures]

    def prefetch(self, keys: Sequence[str], namespace: str = "default",
                 device: torch.device | str | None = None) -> list[Future]:
        """Start loading ``keys`` in background threads; each future yields an entry or None.

        With CUDA the host→device copies run on a side stream so they overlap the caller's
        compute (load chunk k+1 while chunk k is being processed).
        """
        for k in keys:
            check_key(k)
        check_namespace(namespace)

        def load(k: str) -> ChunkEntry | None:
            if device is not None and torch.device(device).type == "cuda":
                stream = torch.cuda.Stream(device=device)
                with torch.cuda.stream(stream):
                    e = self.get(k, namespace, device)
                stream.synchronize()
                return e
            return self.get(k, namespace, device)

        return [self._pool.submit(load, k) for k in keys]

    def contains(self, key: str, namespace: str = "default", probe: bool = False) -> bool:
        """In this store's index; with ``probe``, also asks the persistent tiers directly
        (finds entries another replica wrote to a shared Redis tier)."""
        skeys = [f"{ns}/{key}" for ns in (namespace, PUBLIC_NAMESPACE)]
        for sk in skeys:
            self._wait_pending(sk)
        with self._lock:
            if any(sk in st.sizes for st in self.tiers for sk in skeys):
                return True
        if probe:
            for st in self.tiers:
                if st.tier.persistent and st.healthy:
                    try:
                        if any(st.tier.has(sk) for sk in skeys):
                            return True
                    except TierUnavailableError as e:
                        self._tier_failed(st, e)
        return False

    def delete(self, key: str, namespace: str = "default") -> bool:
        check_key(key)
        check_namespace(namespace)
        skey = f"{namespace}/{key}"
        self._wait_pending(skey)  # a write still in flight would resurrect the entry
        found = False
        for st in self.tiers:
            try:
                if skey in st.sizes or st.tier.persistent:
                    found |= skey in st.sizes
                    st.tier.delete(skey)
            except TierUnavailableError as e:
                self._tier_failed(st, e)
            self._forget(st, skey)
        return found

    def delete_namespace(self, namespace: str) -> int:
        check_namespace(namespace)
        self.flush()
        with self._lock:
            keys = {s for st in self.tiers for s in st.sizes if s.startswith(namespace + "/")}
        for skey in keys:
            self.delete(skey.split("/", 1)[1], namespace)
        return len(keys)

    def reuse_hint(self, key: str, namespace: str, saved_cost: float) -> None:
        """A strategy reports how much compute reusing this chunk saved (feeds GDSF)."""
        with self._lock:
            for st in self.tiers:
                for ns in (namespace, PUBLIC_NAMESPACE):
                    st.policy.reuse_hint(f"{ns}/{key}", saved_cost)

    def stats(self) -> dict:
        with self._lock:
            return {
                **self.counters,
                "codec": self.codec,
                "eviction": self.eviction,
                "tiers": [
                    {"name": st.tier.name, "entries": len(st.sizes), "used_bytes": st.used,
                     "capacity_bytes": st.tier.capacity_bytes, "hits": st.hits,
                     "evictions": st.evictions, "errors": st.errors, "healthy": st.healthy,
                     "last_error": st.last_error}
                    for st in self.tiers
                ],
            }

    def close(self) -> None:
        self.flush()
        self._writer.shutdown(wait=True)
        self._pool.shutdown(wait=True)
        for st in self.tiers:
            st.tier.close()
