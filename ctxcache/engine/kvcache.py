"""The K/V of a span of tokens, for all layers, as one object.

Layout ``[layers, kv_heads, tokens, head_dim]`` for K and V (batch 1): one contiguous tensor
each, so a chunk is two tensors plus its positions — cheap to slice, concatenate, move between
devices and write to safetensors. K is post-RoPE at ``positions`` (see ``rope.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ctxcache.errors import KVMismatchError


@dataclass
class KVCache:
    k: Tensor  # [L, Hkv, T, D], post-RoPE
    v: Tensor  # [L, Hkv, T, D]
    positions: Tensor  # [T] int64: the position each token was encoded at

    def __post_init__(self) -> None:
        if self.k.dim() != 4 or self.k.shape != self.v.shape:
            raise KVMismatchError(
                f"K and V must both be [layers, kv_heads, tokens, head_dim]; got "
                f"{tuple(self.k.shape)} and {tuple(self.v.shape)}"
            )
        if self.positions.dim() != 1 or self.positions.numel() != self.k.shape[2]:
            raise KVMismatchError(
                f"KV holds {self.k.shape[2]} tokens but {self.positions.numel()} positions"
            )

    @property
    def num_tokens(self) -> int:
        return self.k.shape[2]

    def __len__(self) -> int:
        return self.num_tokens

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2 + self.positions.numel() * 8

    @property
    def device(self) -> torch.device:
        return self.k.device

    def slice(self, start: int, end: int | None = None) -> "KVCache":
        end = self.num_tokens if end is None else end
        return KVCache(self.k[:, :, start:end], self.v[:, :, start:end], self.positions[start:end])

    def select(self, index: Tensor) -> "KVCache":
        return KVCache(self.k[:, :, index], self.v[:, :, index], self.positions[index])

    def to(self, device=None, dtype=None, non_blocking: bool = False) -> "KVCache":
        return KVCache(
            self.k.to(device=device, dtype=dtype, non_blocking=non_blocking),
            self.v.to(device=device, dtype=dtype, non_blocking=non_blocking),
            self.positions.to(device=device, non_blocking=non_blocking),
        )

    def clone(self) -> "KVCache":
        return KVCache(self.k.clone(), self.v.clone(), self.positions.clone())

    @staticmethod
    def cat(parts: Sequence["KVCache"]) -> "KVCache":
        parts = [p for p in parts if p is not None]
        if not parts:
            raise KVMismatchError("nothing to concatenate")
        if len(parts) == 1:
            return parts[0]
        shape = parts[0].k.shape
        for p in parts[1:]:
            if p.k.shape[:2] != shape[:2] or p.k.shape[3] != shape[3]:
                raise KVMismatchError(
                    f"cannot concatenate KV of shapes {tuple(shape)} and {tuple(p.k.shape)}"
                )
        return KVCache(
            torch.cat([p.k for p in parts], dim=2),
            torch.cat([p.v for p in parts], dim=2),
            torch.cat([p.positions for p in parts]),
        )
