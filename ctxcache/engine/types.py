"""Plain data of the engine: model shape, dtypes, prefill output, APE's context group, and
the one host→device upload helper."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ctxcache.engine.kvcache import KVCache
from ctxcache.errors import InvalidInputError

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise InvalidInputError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}") from None


@dataclass(frozen=True)
class ModelSpec:
    """Shape facts that K/V caches and kernels must agree on."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_positions: int
    intermediate_size: int = 0

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        elt = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elt


@dataclass(frozen=True)
class ContextGroup:
    """APE's adjustment of attention to parallel-encoded contexts: keys [start, end) are the
    contexts; their logits are divided by ``temperature`` and their share of the softmax is
    weighted like one term whose log-sum-exp is ``temperature · LSE + log(scale)`` (as in the
    APE paper's reference implementation). Kept for the whole decode."""

    start: int
    end: int
    temperature: float = 1.0
    scale: float = 1.0


def upload(values, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Host values → a device tensor without stalling the device queue: staged in pinned
    memory and copied asynchronously (a plain copy from pageable memory waits for every
    queued kernel first)."""
    t = torch.as_tensor(values, dtype=dtype)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


@dataclass
class PrefillOutput:
    kv: KVCache  # K/V of the *new* tokens only
    logits: Tensor | None  # [T, vocab] or [1, vocab] (last) or None
    hidden: Tensor | None = None  # final normed hidden states when asked for
