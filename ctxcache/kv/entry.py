"""What the store keeps per chunk: encoded K/V plus the metadata later strategies need."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from ctxcache.engine.kvcache import KVCache
from ctxcache.kv.codec import get_codec

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_NAMES_DTYPE = {v: k for k, v in _DTYPE_NAMES.items()}
BLOB_DTYPE = "blob"  # EntryMeta.dtype of opaque byte entries (KVStore.put_blob)


@dataclass
class EntryMeta:
    key: str
    namespace: str
    model: str  # engine fingerprint the K/V was computed with
    num_tokens: int
    dtype: str
    codec: str
    recompute_cost: float  # FLOPs to rebuild this chunk by prefill (used by value-aware eviction)
    created_at: float = field(default_factory=time.time)
    prefix_key: str | None = None
    public: bool = False
    extra: dict = field(default_factory=dict)
    first_position: int | None = None  # where the chunk was encoded (host copy of positions[0])

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> "EntryMeta":
        return cls(**json.loads(s))


@dataclass
class ChunkEntry:
    """A decoded chunk cache as callers see it."""

    meta: EntryMeta
    kv: KVCache
    token_ids: Tensor  # [T] int64
    stats: dict[str, Tensor] = field(default_factory=dict)  # per-token statistics, e.g. attention


@dataclass
class StoredEntry:
    """The encoded form every tier holds: a flat dict of tensors + metadata."""

    meta: EntryMeta
    tensors: dict[str, Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @classmethod
    def encode(cls, meta: EntryMeta, kv: KVCache, token_ids: Tensor,
               stats: dict[str, Tensor] | None = None) -> "StoredEntry":
        codec = get_codec(meta.codec)
        tensors = {n: t.contiguous() for n, t in codec.encode(kv.k, kv.v).items()}
        tensors["positions"] = kv.positions.to(torch.int64).contiguous()
        tensors["token_ids"] = token_ids.to(torch.int64).reshape(-1).contiguous()
        for name, t in (stats or {}).items():
            tensors[f"stat.{name}"] = t.contiguous()
        return cls(meta, tensors)

    def decode(self, device: torch.device | str | None = None) -> ChunkEntry:
        dtype = _NAMES_DTYPE[self.meta.dtype]
        t = self.tensors
        if device is not None:
            t = {n: x.to(device, non_blocking=True) for n, x in t.items()}
        k, v = get_codec(self.meta.codec).decode(t, dtype)
        stats = {n[5:]: x for n, x in t.items() if n.startswith("stat.")}
        kv = KVCache(k, v, t["positions"])
        if self.meta.first_position is not None:
            kv.first_position = self.meta.first_position  # placement without a device read
        return ChunkEntry(self.meta, kv, t["token_ids"], stats)

    def to(self, device: torch.device | str, pin: bool = False, copy: bool = False) -> "StoredEntry":
        out = {}
        for n, x in self.tensors.items():
            y = x.to(device, copy=copy and not pin)
            if pin and y.device.type == "cpu":
                y = y.pin_memory()
            out[n] = y
        return StoredEntry(self.meta, out)


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES[dtype]
