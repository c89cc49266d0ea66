"""In-process tiers: GPU memory, or CPU memory (page-locked when CUDA is present so that
host→GPU loads run at full DMA speed and can overlap compute)."""

from __future__ import annotations

import threading
from typing import Iterator

import torch

from ctxcache.kv.entry import StoredEntry
from ctxcache.kv.tiers.base import Tier


class MemoryTier(Tier):
    """Entries returned by ``get`` are shared with the tier: treat them as read-only."""

    persistent = False

    def __init__(self, capacity_bytes: int, device: str = "cpu", pin: bool | None = None):
        super().__init__(capacity_bytes)
        self.device = torch.device(device)
        self.name = "gpu" if self.device.type == "cuda" else "cpu"
        self.pin = (torch.cuda.is_available() if pin is None else pin) and self.device.type == "cpu"
        self._data: dict[str, StoredEntry] = {}
        self._lock = threading.Lock()

    def get(self, skey: str) -> StoredEntry | None:
        with self._lock:
            return self._data.get(skey)

    def put(self, skey: str, entry: StoredEntry) -> int:
        # always an owned copy: the caller may reuse or modify its tensors afterwards
        moved = entry.to(self.device, pin=self.pin, copy=True)
        with self._lock:
            self._data[skey] = moved
        return moved.nbytes

    def delete(self, skey: str) -> None:
        with self._lock:
            self._data.pop(skey, None)

    def scan(self) -> Iterator[tuple[str, int]]:
        with self._lock:
            items = [(k, e.nbytes) for k, e in self._data.items()]
        return iter(items)
