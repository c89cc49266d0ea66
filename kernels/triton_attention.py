"""Selective attention: a gathered set of queries over a mixed K/V, causal by position, GQA
packed, with an unmasked fast loop below each tile's all-visible key bound."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# ---------------------------------------------------------------------------- attention
@triton.jit
def _attn_block(start_n, q, qp, m_i, l_i, acc, K, V, kpos, bias, lo, hi, kvh, skh, skt, svh,
                svt, qk_scale, HAS_BIAS: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr):
    """One key block [start_n, start_n + BLOCK_N) ∩ [lo, hi) of the online softmax, masked by
    position (shared by the plain and split-K kernels)."""
    offs_d = tl.arange(0, D)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    nmask = (offs_n >= lo) & (offs_n < hi)
    k = tl.load(K + kvh * skh + offs_n[:, None] * skt + offs_d[None, :],
                mask=nmask[:, None], other=0.0)
    kp = tl.load(kpos + offs_n, mask=nmask, other=2147483647)
    s = tl.dot(q, tl.trans(k)) * qk_scale
    if HAS_BIAS:
        b = tl.load(bias + offs_n, mask=nmask, other=0.0).to(tl.float32)
        s = s + b[None, :] * 1.4426950408889634
    visible = (kp[None, :] <= qp[:, None]) & nmask[None, :]
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(V + kvh * svh + offs_n[:, None] * svt + offs_d[None, :],
                mask=nmask[:, None], other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _query_tile(Q, qpos, pid_m, kvh, Tq, sqh, sqt, GROUP: tl.constexpr, D: tl.constexpr,
                BLOCK_M: tl.constexpr):
    """Rows of a GQA-packed query tile: row r = (query r // GROUP, head kvh·GROUP + r % GROUP),
    so each K/V block is loaded once for the GROUP query heads that share it."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    qi = rows // GROUP
    qh = kvh * GROUP + rows % GROUP
    offs_d = tl.arange(0, D)
    mmask = qi < Tq
    q = tl.load(Q + qh[:, None] * sqh + qi[:, None] * sqt + offs_d[None, :],
                mask=mmask[:, None], other=0.0)
    qp = tl.load(qpos + qi, mask=mmask, other=-1)
    return qi, qh, mmask, q, qp


@triton.jit
def _attn_block_full(start_n, q, m_i, l_i, acc, K, V, kvh, skh, skt, svh, svt, qk_scale,
                     D: tl.constexpr, BLOCK_N: tl.constexpr):
    """A key block every row of the tile sees: no position test, no masks."""
    offs_d = tl.arange(0, D)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = tl.load(K + kvh * skh + offs_n[:, None] * skt + offs_d[None, :])
    s = tl.dot(q, tl.trans(k)) * qk_scale
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(V + kvh * svh + offs_n[:, None] * svt + offs_d[None, :])
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit(do_not_specialize=['Tq', 'Tk', 'n_tiles'])
def _sel_attn_kernel(Q, K, V, O, qpos, kpos, bias, bounds, scale, Tq, Tk, n_tiles,
                     sqh, sqt, skh, skt, svh, svt, soh, sot,
                     GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, D: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DYN_HI: tl.constexpr,
                     TK_CONST: tl.constexpr):
    # GQA packing: one program serves the GROUP query heads that share a K/V head, so each
    # K/V block is loaded once for all of them. Row r of the tile = (query r // GROUP,
    # head kvh·GROUP + r % GROUP). Tiles run last-first: later queries see more keys, so the
    # longest programs start first and the tail of the grid is short.
    pid_m = n_tiles - 1 - tl.program_id(0)
    kvh = tl.program_id(1)
    qi, qh, mmask, q, qp = _query_tile(Q, qpos, pid_m, kvh, Tq, sqh, sqt, GROUP, D, BLOCK_M)
    offs_d = tl.arange(0, D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    qk_scale = scale * 1.4426950408889634  # exp2 domain
    if DYN_HI:  # sorted keys: [0, lo) seen by every row, [lo, hi) by some, beyond by none
        hi = tl.load(bounds + pid_m)
        lo = tl.load(bounds + n_tiles + pid_m)
        if HAS_BIAS:
            lo = 0
        lo = (lo // BLOCK_N) * BLOCK_N
        for start_n in range(0, lo, BLOCK_N):
            m_i, l_i, acc = _attn_block_full(start_n, q, m_i, l_i, acc, K, V, kvh, skh, skt,
                                             svh, svt, qk_scale, D, BLOCK_N)
        for start_n in range(lo, hi, BLOCK_N):
            m_i, l_i, acc = _attn_block(start_n, q, qp, m_i, l_i, acc, K, V, kpos, bias, 0, hi,
                                        kvh, skh, skt, svh, svt, qk_scale, HAS_BIAS, D, BLOCK_N)
    else:  # the CPU interpreter (numpy 2) cannot loop to a runtime bound: constant bound
        for start_n in range(0, TK_CONST, BLOCK_N):
            m_i, l_i, acc = _attn_block(start_n, q, qp, m_i, l_i, acc, K, V, kpos, bias, 0,
                                        TK_CONST, kvh, skh, skt, svh, svt, qk_scale, HAS_BIAS,
                                        D, BLOCK_N)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(O + qh[:, None] * soh + qi[:, None] * sot + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=mmask[:, None])


# Tile configurations of selective_attention on GPU, by head dim (tuned on H100 with
# benchmarks/tune_attention.py; BLOCK sizes must be powers of two).
ATTN_CONFIGS = {64: {"block_m": 64, "block_n": 128, "num_warps": 4, "num_stages": 3},
                128: {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 3}}
ATTN_CONFIG = ATTN_CONFIGS[128]  # head dims without an entry


def _config(d: int) -> dict:
    return ATTN_CONFIGS.get(d, ATTN_CONFIG)


def _blocks(d: int, device_type: str) -> tuple[int, int]:
    if device_type == "cpu":  # interpreter: small blocks keep tests fast
        return 16, 16
    if d > 128:
        return 32, 32
    c = _config(d)
    return c["block_m"], c["block_n"]


def _tile_m(d: int, device_type: str, group: int) -> int:
    return max(_blocks(d, device_type)[0], triton.next_power_of_2(group))


def attention_plan(q_pos: Tensor, k_pos: Tensor, head_dim: int, k_sorted: bool | None = None,
                   group: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """Position tensors as int32 and, per tile of queries, the key bounds [hi; lo]: keys at
    index ≥ hi are visible to no row of the tile, keys below lo to every row (when keys are
    position-sorted; otherwise hi = all keys, lo = 0).

    A tile holds ``BLOCK_M // group`` queries (× their ``group`` heads). Depends only on
    positions, so a layer loop computes it once per set of active tokens.
    """
    tq, tk = q_pos.numel(), k_pos.numel()
    block_m = _tile_m(head_dim, q_pos.device.type, group)
    n_mb = max(1, triton.cdiv(tq * group, block_m))
    qp = q_pos.to(torch.int32).contiguous()
    kp = k_pos.to(torch.int32).contiguous()
    if k_sorted is None:
        k_sorted = bool(torch.all(kp[1:] >= kp[:-1])) if tk > 1 else True
    if k_sorted and tk and tq:
        # tile j holds rows j·BM … (j+1)·BM−1, i.e. queries row // group (any group size)
        r = torch.arange(n_mb * block_m, device=qp.device)
        qi = (r // group).clamp_max(tq - 1)
        valid = r // group < tq
        tq_pos = qp[qi]
        tile_max = torch.where(valid, tq_pos, -1).view(n_mb, block_m).amax(1)
        tile_min = torch.where(valid, tq_pos, 2147483647).view(n_mb, block_m).amin(1)
        bounds = torch.searchsorted(kp, torch.stack([tile_max, tile_min]), right=True)
        bounds = bounds.to(torch.int32).reshape(-1)
    else:
        bounds = torch.cat([torch.full((n_mb,), tk, dtype=torch.int32, device=qp.device),
                            torch.zeros(n_mb, dtype=torch.int32, device=qp.device)])
    return qp, kp, bounds


def _attention_out(q: Tensor, k: Tensor):
    """Shapes, GQA group and the output: [Hq, Tq, D] as a view of a [Tq, Hq, D] buffer."""
    hq, tq, d = q.shape
    hkv, tk, _ = k.shape
    out = torch.empty(tq, hq, d, dtype=q.dtype, device=q.device).permute(1, 0, 2)
    return hq, tq, d, hkv, tk, hq // hkv, out
