"""In-process tiers: GPU memory, or CPU memory (page-locked when CUDA is present so that
host→GPU loads run at full DMA speed and can overlap compute)."""

from __future__ import annotations

import threading
from typing import Iterator

import torch

from ctxcache.kv.entry import StoredEntry
from ctxcache.kv.pinned import PinnedPool, carve, carved_size
from ctxcache.kv.tiers.base import Tier


class MemoryTier(Tier):
    """Entries returned by ``get`` are shared with the tier: treat them as read-only.

    A pinned CPU tier takes its page-locked memory from a ``PinnedPool`` of the tier's
    capacity, so storing a chunk never calls the slow page-locked allocator on the way, and
    copies from the GPU go straight into it on the caller's stream (a side stream for the
    store's write-behind thread: they overlap the next request's compute)."""

    persistent = False

    def __init__(self, capacity_bytes: int, device: str = "cpu", pin: bool | None = None):
        super().__init__(capacity_bytes)
        self.device = torch.device(device)
        self.name = "gpu" if self.device.type == "cuda" else "cpu"
        self.pin = (torch.cuda.is_available() if pin is None else pin) and self.device.type == "cpu"
        self.pool = PinnedPool(capacity_bytes + (64 << 20), min(256 << 20, max(
            capacity_bytes // 8, 16 << 20))) if self.pin else None
        self._data: dict[str, StoredEntry] = {}
        self._lock = threading.Lock()

    def get(self, skey: str) -> StoredEntry | None:
        with self._lock:
            return self._data.get(skey)

    def put(self, skey: str, entry: StoredEntry) -> int:
        # always an owned copy: the caller may reuse or modify its tensors afterwards
        moved = self._to_pool(entry) if self.pool is not None else None
        if moved is None:
            moved = entry.to(self.device, pin=self.pin, copy=True)
        with self._lock:
            self._data[skey] = moved
        return moved.nbytes

    def _to_pool(self, entry: StoredEntry) -> StoredEntry | None:
        block = self.pool.alloc(carved_size(entry.tensors))
        if block is None:
            return None
        dst = carve(self.pool, block, entry.tensors)
        on_gpu = False
        for name, t in entry.tensors.items():
            on_gpu |= t.is_cuda
            dst[name].copy_(t, non_blocking=True)
        if on_gpu:  # the copies ran on the current stream: done before the entry is visible
            torch.cuda.current_stream().synchronize()
        return StoredEntry(entry.meta, dst)

    def delete(self, skey: str) -> None:
        with self._lock:
            self._data.pop(skey, None)

    def scan(self) -> Iterator[tuple[str, int]]:
        with self._lock:
            items = [(k, e.nbytes) for k, e in self._data.items()]
        return iter(items)
