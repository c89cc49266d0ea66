"""Chunk KV store: content keys, tiers (GPU, CPU, disk, Redis), eviction, codecs, tenancy."""

from ctxcache.kv.codec import QuantCodec, RawCodec, get_codec
from ctxcache.kv.entry import ChunkEntry, EntryMeta, StoredEntry
from ctxcache.kv.eviction import AdmissionPolicy, GDSFPolicy, LRUPolicy, make_policy
from ctxcache.kv.keys import PUBLIC_NAMESPACE, chunk_key
from ctxcache.kv.serialize import CorruptEntryError, pack, unpack
from ctxcache.kv.store import KVStore
from ctxcache.kv.tiers import DiskTier, MemoryTier, RedisTier, Tier, TierUnavailableError

__all__ = [
    "AdmissionPolicy", "ChunkEntry", "CorruptEntryError", "DiskTier", "EntryMeta", "GDSFPolicy",
    "KVStore", "LRUPolicy", "MemoryTier", "PUBLIC_NAMESPACE", "QuantCodec", "RawCodec",
    "RedisTier", "StoredEntry", "Tier", "TierUnavailableError", "chunk_key", "get_codec",
    "make_policy", "pack", "unpack",
]
