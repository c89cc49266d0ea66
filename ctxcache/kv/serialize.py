"""Byte form of a stored entry for disk and Redis: a safetensors payload behind a checksum.

Layout: ``MAGIC (8 bytes) | xxh3-128 digest of payload (16) | payload length (8, LE) | payload``,
where the payload is a standard safetensors file (any safetensors reader opens it; the entry's
metadata is in the header's ``__metadata__``). A torn write (truncated file, partial Redis
value) fails the length check, any flipped bit fails the digest; both raise
``CorruptEntryError`` and the caller treats the entry as a miss.

Writing and reading are zero-copy where possible, because a chunk cache is large (128 KiB per
token for an 8B model) and loading it must stay far cheaper than recomputing it: tensors are
hashed and written straight from their memory, and read back as views over the one buffer the
bytes were read into (``torch.frombuffer``), instead of the two or three copies a
bytes-in/bytes-out round trip costs.
"""

from __future__ import annotations

import json
import struct
from typing import BinaryIO

import torch
import xxhash

from ctxcache.errors import CtxCacheError
from ctxcache.kv.entry import EntryMeta, StoredEntry

MAGIC = b"CTXKV\x001\n"
HEADER = len(MAGIC) + 16 + 8

_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}
_ST_TORCH = {v: k for k, v in _ST_DTYPES.items()}


class CorruptEntryError(CtxCacheError):
    """Stored bytes failed the length or checksum test, or do not parse."""


def _raw(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without copying."""
    t = t.detach().contiguous()
    if t.device.type != "cpu":
        t = t.cpu()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def payload_parts(entry: StoredEntry) -> list[memoryview | bytes]:
    """The safetensors payload as a list of buffers (header, then each tensor's bytes)."""
    names = sorted(entry.tensors)
    raws, header, off = [], {}, 0
    for n in names:
        t = entry.tensors[n]
        r = _raw(t)
        header[n] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                     "data_offsets": [off, off + r.nbytes]}
        raws.append(r)
        off += r.nbytes
    header["__metadata__"] = {"meta": entry.meta.to_json()}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    return [struct.pack("<Q", len(hb)) + hb, *raws]


def pack_parts(entry: StoredEntry) -> list[memoryview | bytes]:
    """Checksummed record as a list of buffers ready for ``writelines``."""
    parts = payload_parts(entry)
    h = xxhash.xxh3_128()
    n = 0
    for p in parts:
        h.update(p)
        n += len(p) if isinstance(p, bytes) else p.nbytes
    return [MAGIC + h.digest() + struct.pack("<Q", n), *parts]


def pack(entry: StoredEntry) -> bytearray:
    """The whole record in one buffer (one copy of the tensor bytes)."""
    parts = pack_parts(entry)
    buf = bytearray(sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts))
    off = 0
    for p in parts:
        n = len(p) if isinstance(p, bytes) else p.nbytes
        buf[off: off + n] = p
        off += n
    return buf


def write_to(f: BinaryIO, entry: StoredEntry) -> int:
    parts = pack_parts(entry)
    f.writelines(parts)
    return sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)


def unpack(data: bytes | bytearray | memoryview) -> StoredEntry:
    """Verify and parse a record. With a writable buffer (bytearray) tensors are views over it."""
    mv = memoryview(data)
    if len(mv) < HEADER or bytes(mv[: len(MAGIC)]) != MAGIC:
        raise CorruptEntryError("bad header")
    digest = bytes(mv[len(MAGIC): len(MAGIC) + 16])
    (n,) = struct.unpack("<Q", mv[len(MAGIC) + 16: HEADER])
    payload = mv[HEADER:]
    if len(payload) != n:
        raise CorruptEntryError(f"truncated: {len(payload)} of {n} payload bytes")
    if xxhash.xxh3_128_digest(payload) != digest:
        raise CorruptEntryError("checksum mismatch")
    if isinstance(data, bytes):  # frombuffer needs a writable buffer to avoid aliasing bytes
        data = bytearray(data)
        mv = memoryview(data)
    try:
        (hlen,) = struct.unpack("<Q", mv[HEADER: HEADER + 8])
        header = json.loads(bytes(mv[HEADER + 8: HEADER + 8 + hlen]))
        meta = EntryMeta.from_json(header.pop("__metadata__")["meta"])
        base = HEADER + 8 + hlen
        tensors = {}
        for name, info in header.items():
            dtype = _ST_TORCH[info["dtype"]]
            b, e = info["data_offsets"]
            count = (e - b) // torch.empty((), dtype=dtype).element_size()
            t = torch.frombuffer(data, dtype=dtype, count=count, offset=base + b) if count else \
                torch.empty(0, dtype=dtype)
            tensors[name] = t.reshape(info["shape"])
    except (ValueError, KeyError, TypeError, json.JSONDecodeError, struct.error) as e:
        raise CorruptEntryError(f"unparseable record: {e}") from e
    return StoredEntry(meta, tensors)


def read_from(path) -> StoredEntry:
    """Read a record file into one buffer (a single copy out of the page cache) and unpack it."""
    with open(path, "rb", buffering=0) as f:
        size = f.seek(0, 2)
        f.seek(0)
        buf = bytearray(size)
        got = f.readinto(buf)
    if got != size:
        raise CorruptEntryError("short read")
    return unpack(buf)
