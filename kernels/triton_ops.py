"""Triton kernels for chunk-KV reuse (the public entry points). Each has a torch reference in
``reference.py``.

* ``selective_attention`` flash-style attention of a gathered subset of queries over the whole
                          mixed K/V, causal by original positions, GQA, optional per-key bias,
                          online softmax with fp32 accumulation; key blocks past a tile's last
                          visible position are skipped, blocks every row sees run unmasked
                          (``triton_attention.py``); small query sets and APE's two-group
                          attention split the keys (``triton_splitk.py``).
* ``assemble_kv``         a prompt's K/V from any number of cached spans in one launch, keys
                          re-rotated on the way (``triton_assembly.py``).
* ``rope_qkv`` / ``add_rms_norm`` / ``silu_mul`` / ``kv_deviation(_at)`` / ``rope_shift`` /
  ``scatter_kv``          the layer loop's fused steps (``triton_layer.py``).

All run on CUDA, and on CPU under ``TRITON_INTERPRET=1`` (slow: tests use tiny shapes).
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from ctxcache.kernels.triton_assembly import assemble_kv, source_offsets  # noqa: F401
from ctxcache.kernels.triton_attention import (  # noqa: F401
    ATTN_CONFIG, ATTN_CONFIGS, _attention_out, _blocks, _config, _sel_attn_kernel, _tile_m,
    attention_plan,
)
from ctxcache.kernels.triton_layer import (  # noqa: F401
    add_rms_norm, kv_deviation, kv_deviation_at, rope_qkv, rope_shift, scatter_kv, silu_mul,
)
from ctxcache.kernels.triton_splitk import (  # noqa: F401
    _sm_count, key_splits, split_attention, split_plan,
)


def auto_plan(q_pos: Tensor, k_pos: Tensor, head_dim: int, k_sorted: bool | None = None,
              group: int = 1, scale: float | None = None,
              context: tuple[int, int, float] | None = None) -> tuple:
    """The attention plan for this query set: the plain one, or a split-K plan when the
    queries are too few to fill the GPU (or for APE's ``context`` group). Shapes decide, so
    the choice is made on the host and stays fixed for a layer loop."""
    tq, tk = q_pos.numel(), k_pos.numel()
    if scale is not None and (context is not None or (
            q_pos.device.type == "cuda" and tk >= 1024 and
            triton.cdiv(tq * group, _tile_m(head_dim, "cuda", group)) * 2 < _sm_count(
                q_pos.device))):
        return split_plan(q_pos, k_pos, head_dim, group, scale, bool(k_sorted), context)
    return attention_plan(q_pos, k_pos, head_dim, k_sorted, group)


def selective_attention(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor,
                        scale: float, key_bias: Tensor | None = None,
                        k_sorted: bool | None = None, plan=None,
                        log_scale: float | None = None, temperature: float = 1.0,
                        context: tuple[int, int] | None = None) -> Tensor:
    """See ``reference.selective_attention_ref``. q [Hq, Tq, D], k/v [Hkv, Tk, D] (last dim
    contiguous), positions int. Returns [Hq, Tq, D] — a view of a [Tq, Hq, D] buffer, so the
    caller's reshape to [Tq, Hq·D] costs no copy. ``plan`` from ``auto_plan`` with
    ``group = Hq // Hkv`` (a split-K plan runs ``split_attention``; ``log_scale`` and
    ``temperature`` then apply APE's adjustment to the plan's context group, which the plan
    carries: ``context`` is for the torch fallback's signature)."""
    if plan is not None and len(plan) == 4:
        return split_attention(q, k, v, plan, log_scale, temperature)
    hq, tq, d, hkv, tk, group, out = _attention_out(q, k)
    if tq == 0:
        return out
    BLOCK_N = _blocks(d, q.device.type)[1]
    BLOCK_M = _tile_m(d, q.device.type, group)
    qp, kp, bounds = plan if plan is not None else attention_plan(q_pos, k_pos, d, k_sorted,
                                                                 group)
    n_tiles = bounds.numel() // 2
    bias = key_bias.to(torch.float32).contiguous() if key_bias is not None else kp
    cuda = q.device.type == "cuda"
    cfg = _config(d)
    _sel_attn_kernel[(n_tiles, hkv)](
        q, k, v, out, qp, kp, bias, bounds, scale, tq, tk, n_tiles,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        GROUP=group, HAS_BIAS=key_bias is not None, D=d, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        DYN_HI=cuda, TK_CONST=0 if cuda else tk,
        num_warps=cfg["num_warps"] if cuda else 1, num_stages=cfg["num_stages"] if cuda else 1)
    return out
