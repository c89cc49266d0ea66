"""Paged K/V memory for every running sequence (vLLM-style blocks).

One buffer per K and V, ``[layers, kv_heads, num_blocks · block_size, head_dim]``: a layer's
slice has the same ``[Hkv, slots, D]`` layout as a contiguous sequence's K/V, so the fused
RoPE+scatter step writes a decode row straight into its page (slot = block · block_size +
offset) and assembled prompts land in pages with one indexed copy. A sequence owns a *block
table* (its blocks in order); nothing is sized to prompt + max_tokens up front.

Blocks whose content is fully determined by the tokens before them (an exact causal prefix:
the system prompt, a full-prefill prompt) are *shared*: keyed by a hash of every token up to
the block's end, reference-counted, and kept after their last user leaves (least recently
used first out) so the next request with that prefix maps them instead of copying. Block 0 is
a scratch page that padding rows of a batch write to; it is never handed out.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

import numpy as np
import torch
import xxhash
from torch import Tensor

from ctxcache.engine.kvcache import KVCache
from ctxcache.errors import CtxCacheError, InvalidInputError


@dataclass
class ResidentPrefix:
    """A prompt's leading tokens whose exact causal K/V (positions 0..n-1) is in the pool.

    Exact prefix reuse takes these rows from device memory instead of the chunk store: no
    store lookup, no host-to-device copy — an agent loop's next step finds its whole previous
    prompt here and prefills only what is new."""

    n_tokens: int
    kv: KVCache
    token_ids: list[int]  # the tokens the rows are of (a build checks its prompt starts so)


class OutOfBlocks(CtxCacheError):
    """The K/V pool has too few free blocks for this allocation (the scheduler preempts)."""


@dataclass
class PoolStats:
    num_blocks: int
    block_size: int
    used: int  # blocks referenced by running sequences
    cached: int  # unreferenced shared blocks kept for later prefix hits
    free: int
    shared_hits: int  # blocks mapped from the shared set instead of written
    bytes_per_block: int

    @property
    def usage(self) -> float:
        return self.used / max(1, self.num_blocks - 1)

    def as_dict(self) -> dict:
        return {"num_blocks": self.num_blocks, "block_size": self.block_size, "used": self.used,
                "cached": self.cached, "free": self.free, "shared_hits": self.shared_hits,
                "usage": round(self.usage, 4), "bytes_per_block": self.bytes_per_block}


def block_hashes(token_ids: list[int], block_size: int, n_blocks: int,
                 namespace: str = "") -> list[str]:
    """Chained content hash of each full block: block i's key covers tokens [0, (i+1)·bs).

    The chain starts from the owner's ``namespace``: tenants never map each other's pages, the
    same isolation as the chunk store's namespaces (no tenant can time another's prompts)."""
    out, h = [], xxhash.xxh3_128()
    if namespace:
        h.update(len(namespace.encode()).to_bytes(4, "little") + namespace.encode())
    for i in range(n_blocks):
        part = token_ids[i * block_size:(i + 1) * block_size]
        h.update(len(part).to_bytes(4, "little"))
        h.update(np.asarray(part, dtype="<i4").tobytes())  # 4-byte little-endian each
        out.append(h.hexdigest())
    return out


class PagedKVPool:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_blocks: int,
                 block_size: int = 16, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        if num_blocks < 2:
            raise InvalidInputError("a K/V pool needs at least 2 blocks (one is scratch)")
        if block_size < 1:
            raise InvalidInputError("block_size must be positive")
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (num_layers, num_kv_heads, num_blocks * block_size, head_dim)
        # uninitialised: on the host, pages are committed only when first written
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self.k[:, :, :block_size].zero_()  # the scratch page padding rows read and write
        self.v[:, :, :block_size].zero_()
        self.bytes_per_block = 2 * num_layers * num_kv_heads * block_size * head_dim * \
            self.k.element_size()
        self._free: deque[int] = deque(range(1, num_blocks))
        self._ref = [0] * num_blocks
        self._hash_of: dict[int, str] = {}
        self._by_hash: dict[str, int] = {}
        self._cached: "OrderedDict[int, None]" = OrderedDict()  # ref 0, kept for prefix hits
        self.shared_hits = 0

    @classmethod
    def for_engine(cls, engine, *, bytes_: int | None = None, fraction: float = 0.5,
                   block_size: int = 16, max_blocks: int | None = None) -> "PagedKVPool":
        """Size the pool from a byte budget, or on CUDA from ``fraction`` of the memory free
        now (after the weights); on CPU without a budget, room for 32K tokens."""
        s = engine.spec
        per_block = 2 * s.num_layers * s.num_kv_heads * block_size * s.head_dim * \
            torch.empty((), dtype=engine.dtype).element_size()
        if bytes_ is None:
            if engine.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(engine.device)
                bytes_ = int(free * fraction)
            else:
                bytes_ = per_block * (32768 // block_size)
        n = max(2, bytes_ // per_block)
        if max_blocks is not None:
            n = min(n, max_blocks)
        return cls(s.num_layers, s.num_kv_heads, s.head_dim, n, block_size, engine.dtype,
                   engine.device)

    # ------------------------------------------------------------------ accounting
    @property
    def num_free(self) -> int:
        """Blocks an allocation can take now (free + cached-but-unreferenced)."""
        return len(self._free) + len(self._cached)

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def stats(self) -> PoolStats:
        cached = len(self._cached)
        free = len(self._free)
        return PoolStats(self.num_blocks, self.block_size, self.num_blocks - 1 - free - cached,
                         cached, free, self.shared_hits, self.bytes_per_block)

    # ------------------------------------------------------------------ allocation
    def _take(self) -> int:
        if self._free:
            b = self._free.popleft()
        elif self._cached:
            b, _ = self._cached.popitem(last=False)  # evict the least recently used
            h = self._hash_of.pop(b)
            del self._by_hash[h]
        else:
            raise OutOfBlocks("K/V pool exhausted")
        self._ref[b] = 1
        return b

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise OutOfBlocks(f"need {n} K/V blocks, {self.num_free} free")
        return [self._take() for _ in range(n)]

    def lookup_shared(self, hashes: list[str]) -> list[int]:
        """The longest run of leading blocks already in the shared set (referenced for the
        caller)."""
        out = self.peek_shared(hashes)
        for b in out:
            if self._ref[b] == 0:
                self._cached.pop(b, None)
            self._ref[b] += 1
        self.shared_hits += len(out)
        return out

    def peek_shared(self, hashes: list[str]) -> list[int]:
        """The longest run of leading blocks in the shared set, without referencing them."""
        out = []
        for h in hashes:
            b = self._by_hash.get(h)
            if b is None:
                break
            out.append(b)
        return out

    def resident(self, token_ids: list[int], hashes: list[str]) -> "ResidentPrefix | None":
        """The exact K/V of the prompt's longest leading run of blocks still in the pool (a
        finished request's prompt, another running sequence's prefix), as contiguous tensors
        — or None. ``hashes`` are the prompt's ``block_hashes`` (at least its full blocks but
        the last token's). The prompt's last token is never covered: its logits must be
        computed."""
        n_blocks = max(0, len(token_ids) - 1) // self.block_size
        if not n_blocks:
            return None
        blocks = self.peek_shared(hashes[:n_blocks])
        if not blocks:
            return None
        n = len(blocks) * self.block_size
        k, v = self.gather(blocks, n)
        return ResidentPrefix(n, KVCache(k, v, torch.arange(n, device=k.device)),
                              list(token_ids[:n]))

    def publish(self, block: int, h: str) -> None:
        """Make a block (already written, exact causal content) findable by its prefix hash."""
        if h in self._by_hash or block in self._hash_of:
            return
        self._hash_of[block] = h
        self._by_hash[h] = block

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            if b <= 0:
                continue
            self._ref[b] -= 1
            if self._ref[b] > 0:
                continue
            if b in self._hash_of:
                self._cached[b] = None
            else:
                self._free.append(b)

    # ------------------------------------------------------------------ data movement
    def slots(self, blocks: list[int], start: int, end: int) -> list[int]:
        """Slot indices of token positions [start, end) of a sequence with block table
        ``blocks``."""
        bs = self.block_size
        return [blocks[t // bs] * bs + t % bs for t in range(start, end)]

    def write(self, blocks: list[int], start: int, k: Tensor, v: Tensor) -> None:
        """Write K/V rows [L, Hkv, n, D] at token offsets [start, start + n) of a sequence."""
        n = k.shape[2]
        if not n:
            return
        idx = torch.as_tensor(self.slots(blocks, start, start + n), dtype=torch.long)
        idx = idx.to(self.k.device, non_blocking=True)
        self.k.index_copy_(2, idx, k.to(self.k.dtype))
        self.v.index_copy_(2, idx, v.to(self.v.dtype))

    def gather(self, blocks: list[int], n: int) -> tuple[Tensor, Tensor]:
        """A sequence's first ``n`` K/V rows as contiguous [L, Hkv, n, D] tensors."""
        idx = torch.as_tensor(self.slots(blocks, 0, n), dtype=torch.long).to(self.k.device)
        return self.k.index_select(2, idx), self.v.index_select(2, idx)
