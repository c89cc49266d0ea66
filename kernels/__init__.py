"""Hot-path operations of chunk-KV reuse, with two interchangeable backends.

``get_ops("torch")`` — plain PyTorch (SDPA with a boolean position mask, index writes): the
fallback on CPU. ``get_ops("triton")`` — our Triton kernels (``triton_ops.py``), for CUDA (or CPU
under ``TRITON_INTERPRET=1``, for tests). ``get_ops("auto")`` picks Triton when CUDA and Triton
are available. ``reference.py`` holds the plain definitions both are tested against.

Installed as ``ctxcache.kernels``; importing it never requires Triton.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ctxcache.kernels.reference import (
    add_rms_norm_ref, grouped_attention_ref, kv_deviation_at_ref, kv_deviation_ref,
    rope_shift_ref, silu_mul_ref,
)


@dataclass(frozen=True)
class Ops:
    name: str
    rope_shift: Callable[[Tensor, Tensor, Tensor], Tensor]  # in place on k, returns k
    selective_attention: Callable[..., Tensor]
    kv_deviation: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
    scatter_kv: Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], None]
    plan: Callable[..., object] = lambda q_pos, k_pos, head_dim, k_sorted=None, group=1, \
        scale=None, context=None: None
    # fused steps of the layer loop (h += r; RMSNorm), SwiGLU gate, deviation against cached
    # rows in place; the Triton set adds one-launch RoPE(+scatter) and chunk assembly
    add_rms_norm: Callable[..., Tensor] = add_rms_norm_ref
    silu_mul: Callable[[Tensor], Tensor] = silu_mul_ref
    kv_deviation_at: Callable[..., Tensor] = kv_deviation_at_ref
    rope_qkv: Callable[..., None] | None = None
    assemble_kv: Callable[..., None] | None = None
    # decode of a batch over a paged K/V pool: (q [B,Hq,D], K, V [Hkv,slots,D], block_tables,
    # seq_lens, block_size, scale, slot_lists=None) -> [B, Hq, D]
    paged_decode: Callable[..., Tensor] | None = None


def _torch_rope_shift(k: Tensor, delta: Tensor, inv_freq: Tensor) -> Tensor:
    k.copy_(rope_shift_ref(k, delta.to(k.device), inv_freq.to(k.device)))
    return k


def _torch_selective_attention(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor,
                               scale: float, key_bias: Tensor | None = None,
                               k_sorted: bool | None = None, plan=None,
                               log_scale: float | None = None, temperature: float = 1.0,
                               context: tuple[int, int] | None = None) -> Tensor:
    if context is not None:
        return grouped_attention_ref(q, k, v, q_pos, k_pos, scale, context[0], context[1],
                                     temperature, log_scale or 0.0)
    hq, hkv = q.shape[0], k.shape[0]
    if q.shape[1] == 0:
        return q.new_zeros(q.shape)
    mask = k_pos[None, :] <= q_pos[:, None]
    if key_bias is not None:
        neg = torch.finfo(torch.float32).min
        mask = torch.where(mask, key_bias[None, :].float(), torch.full_like(
            key_bias[None, :].float(), neg)).to(q.dtype)
    if hq != hkv:
        k = k.repeat_interleave(hq // hkv, dim=0)
        v = v.repeat_interleave(hq // hkv, dim=0)
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask,
                                          scale=scale)[0]


def _torch_scatter(K: Tensor, V: Tensor, index: Tensor, k_rows: Tensor, v_rows: Tensor) -> None:
    K[:, index] = k_rows
    V[:, index] = v_rows


def _torch_paged_decode(q: Tensor, K: Tensor, V: Tensor, block_tables: Tensor, seq_lens: Tensor,
                        block_size: int, scale: float, slot_lists: list | None = None,
                        groups=None) -> Tensor:
    """Per sequence: gather its keys from the pages and run SDPA exactly as a contiguous
    batch-1 decode does (so batched greedy decoding reproduces batch 1 on CPU). ``slot_lists``
    (one index tensor per sequence, built once per step) saves re-deriving slots per layer.
    APE's ``groups`` are left to the caller on this path (the runner's per-row override)."""
    if slot_lists is None:
        bs = block_size
        slot_lists = []
        for row, n in zip(block_tables.tolist(), seq_lens.tolist()):
            blocks = torch.as_tensor(row[:-(-n // bs)], dtype=torch.long)
            slot_lists.append((blocks[:, None] * bs + torch.arange(bs)).reshape(-1)[:n])
    out = q.new_zeros(q.shape)
    gqa = q.shape[1] != K.shape[0]
    for b, slots in enumerate(slot_lists):
        if slots is None or not slots.numel():
            continue
        k, v = K.index_select(1, slots), V.index_select(1, slots)
        out[b] = F.scaled_dot_product_attention(q[b][None, :, None], k[None], v[None],
                                                scale=scale, enable_gqa=gqa)[0, :, 0]
    return out


TORCH_OPS = Ops("torch", _torch_rope_shift, _torch_selective_attention, kv_deviation_ref,
                _torch_scatter, paged_decode=_torch_paged_decode)


def triton_available(device: str | torch.device = "cuda") -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if torch.device(device).type == "cuda":
        return torch.cuda.is_available()
    return os.environ.get("TRITON_INTERPRET") == "1"


def get_ops(backend: str = "auto", device: str | torch.device = "cpu") -> Ops:
    if backend == "torch":
        return TORCH_OPS
    if backend == "auto":
        if torch.device(device).type == "cuda" and triton_available("cuda"):
            backend = "triton"
        else:
            return TORCH_OPS
    if backend != "triton":
        from ctxcache.errors import InvalidInputError

        raise InvalidInputError(f"unknown kernels backend {backend!r}; use torch, triton or auto")
    from ctxcache.kernels import triton_ops as t

    from ctxcache.kernels.triton_paged import paged_decode_attention

    def paged(q, K, V, block_tables, seq_lens, block_size, scale, slot_lists=None, groups=None):
        return paged_decode_attention(q, K, V, block_tables, seq_lens, block_size, scale,
                                      groups=groups)

    return Ops("triton", t.rope_shift, t.selective_attention, t.kv_deviation, t.scatter_kv,
               t.auto_plan, t.add_rms_norm, t.silu_mul, t.kv_deviation_at, t.rope_qkv,
               t.assemble_kv, paged)
