"""A pool of page-locked host memory for the CPU tier.

Why: page-locked (pinned) memory is what lets host→GPU loads run at full DMA speed, overlap
compute, and be read in place by kernels. But allocating it (``cudaHostAlloc``) takes
milliseconds per call and freeing it synchronises the device, so allocating per stored chunk
puts that cost on the serving path. The pool allocates a few large slabs once and carves
entries out of them (first fit, 256-byte aligned, neighbours merged on free); it never holds
more than ``max_bytes``.

A block is reused only once nothing can still read it: every tensor carved from it must be
gone (so every kernel that reads it has been launched), and then the device must have been
synchronised once (so those kernels have finished) — the pool does that lazily, only when it
would otherwise need a new slab.
"""

from __future__ import annotations

import bisect
import threading
import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor

ALIGN = 256


@dataclass
class _Slab:
    buf: Tensor  # uint8, pinned
    free: list[tuple[int, int]] = field(default_factory=list)  # sorted (offset, size)


@dataclass(frozen=True)
class Block:
    slab: int
    offset: int
    size: int
    view: Tensor  # uint8 [size] inside the slab


class PinnedPool:
    def __init__(self, max_bytes: int, slab_bytes: int = 256 << 20, pin: bool | None = None):
        self.max_bytes = int(max_bytes)
        self.slab_bytes = int(slab_bytes)
        self.pin = torch.cuda.is_available() if pin is None else pin
        self._slabs: list[_Slab] = []
        self._lock = threading.Lock()
        self.allocated = 0  # bytes of slabs
        self.in_use = 0
        self._pending: list[Block] = []  # released, waiting for a device fence

    def _new_slab(self, need: int) -> int | None:
        size = max(self.slab_bytes, -(-need // ALIGN) * ALIGN)
        if self.allocated + size > self.max_bytes:
            return None
        buf = torch.empty(size, dtype=torch.uint8, pin_memory=self.pin)
        self._slabs.append(_Slab(buf, [(0, size)]))
        self.allocated += size
        return len(self._slabs) - 1

    def alloc(self, nbytes: int) -> Block | None:
        """A block of at least ``nbytes``, or None when the pool is full."""
        need = max(ALIGN, -(-int(nbytes) // ALIGN) * ALIGN)
        with self._lock:
            for attempt in range(2):
                for si, slab in enumerate(self._slabs):
                    for j, (off, size) in enumerate(slab.free):
                        if size >= need:
                            return self._take(si, j, need)
                if attempt or not self._pending:
                    break
                self._reclaim()
            si = self._new_slab(need)
            if si is None:
                return None
            return self._take(si, 0, need)

    def _reclaim(self) -> None:
        """Released blocks become free once the device has finished what was queued."""
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        pending, self._pending = self._pending, []
        for b in pending:
            self._free_now(b)

    def _take(self, si: int, j: int, need: int) -> Block:
        slab = self._slabs[si]
        off, size = slab.free[j]
        if size == need:
            slab.free.pop(j)
        else:
            slab.free[j] = (off + need, size - need)
        self.in_use += need
        return Block(si, off, need, slab.buf[off:off + need])

    def release(self, block: Block) -> None:
        """Give a block back; it is reused after the next device fence."""
        with self._lock:
            self._pending.append(block)
            self.in_use -= block.size

    def _free_now(self, block: Block) -> None:
        """Insert into the slab's free list, merged with free neighbours (lock held)."""
        free = self._slabs[block.slab].free
        i = bisect.bisect_left(free, (block.offset, 0))
        free.insert(i, (block.offset, block.size))
        if i + 1 < len(free) and free[i][0] + free[i][1] == free[i + 1][0]:
            free[i] = (free[i][0], free[i][1] + free[i + 1][1])
            free.pop(i + 1)
        if i > 0 and free[i - 1][0] + free[i - 1][1] == free[i][0]:
            free[i - 1] = (free[i - 1][0], free[i - 1][1] + free[i][1])
            free.pop(i)

    def stats(self) -> dict:
        with self._lock:
            return {"slabs": len(self._slabs), "allocated_bytes": self.allocated,
                    "in_use_bytes": self.in_use}


def carve(pool: PinnedPool, block: Block, like: dict[str, Tensor]) -> dict[str, Tensor]:
    """Tensors shaped like ``like`` laid out back to back (aligned) inside ``block``; the block
    is released to ``pool`` when the last of them is garbage-collected."""
    out, off = {}, 0
    for name, t in like.items():
        n = t.numel() * t.element_size()
        out[name] = block.view[off:off + n].view(t.dtype).view(t.shape)
        off += -(-n // ALIGN) * ALIGN
    left = [len(out)]
    lock = threading.Lock()

    def gone() -> None:
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last:
            pool.release(block)

    for t in out.values():
        weakref.finalize(t, gone)
    return out


def carved_size(like: dict[str, Tensor]) -> int:
    return sum(-(-t.numel() * t.element_size() // ALIGN) * ALIGN for t in like.values())
