"""Byte form of a stored entry for disk and Redis: safetensors payload behind a checksum.

Layout: ``MAGIC (8 bytes) | xxh3-128 digest of payload (16) | payload length (8, LE) | payload``.
A torn write (truncated file, partial Redis value) fails the length check, any flipped bit fails
the digest; both raise ``CorruptEntryError`` and the caller treats the entry as a miss.
"""

from __future__ import annotations

import json
import struct

import xxhash
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ctxcache.errors import CtxCacheError
from ctxcache.kv.entry import EntryMeta, StoredEntry

MAGIC = b"CTXKV\x001\n"
HEADER = len(MAGIC) + 16 + 8


class CorruptEntryError(CtxCacheError):
    """Stored bytes failed the length or checksum test."""


def pack(entry: StoredEntry) -> bytes:
    tensors = {n: t.detach().cpu().contiguous() for n, t in entry.tensors.items()}
    payload = st_save(tensors, metadata={"meta": entry.meta.to_json()})
    return MAGIC + xxhash.xxh3_128_digest(payload) + struct.pack("<Q", len(payload)) + payload


def unpack(data: bytes | memoryview) -> StoredEntry:
    data = memoryview(data)
    if len(data) < HEADER or bytes(data[: len(MAGIC)]) != MAGIC:
        raise CorruptEntryError("bad header")
    digest = bytes(data[len(MAGIC): len(MAGIC) + 16])
    (n,) = struct.unpack("<Q", data[len(MAGIC) + 16: HEADER])
    payload = data[HEADER:]
    if len(payload) != n:
        raise CorruptEntryError(f"truncated: {len(payload)} of {n} payload bytes")
    if xxhash.xxh3_128_digest(payload) != digest:
        raise CorruptEntryError("checksum mismatch")
    payload = bytes(payload)
    return StoredEntry(_read_meta(payload), st_load(payload))


def _read_meta(payload: bytes) -> EntryMeta:
    """The entry metadata lives in the safetensors header's ``__metadata__``."""
    (hlen,) = struct.unpack("<Q", payload[:8])
    header = json.loads(payload[8: 8 + hlen])
    return EntryMeta.from_json(header["__metadata__"]["meta"])
