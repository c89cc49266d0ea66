"""Paged split-K decode attention: one query token per sequence over K/V scattered in pages.

Grid (sequence, K/V head, split). Each program takes the GQA group of query heads that share
one K/V head (packed as rows of one tile, so each key block is loaded once for all of them),
walks its share of the sequence's keys — slots found through the block table, token by token,
so any block size works — and writes a partial softmax with its log2-sum-exp; the split-K
combine of ``triton_splitk.py`` merges the splits. Each program derives its key range from the
sequence length on the device: the launch shape depends only on the batch size, so a captured
CUDA graph replays for any lengths.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ctxcache.kernels.triton_splitk import _combine_kernel, _sm_count, _store_partial


@triton.jit(do_not_specialize=['B', 'S'])
def _paged_decode_kernel(Q, K, V, OP, LP, TABLES, LENS, CS, CE, TEMP, scale, B, Hq, s_qb, s_qh,
                         s_kh, s_kt, s_vh, s_vt, s_tb, S, GROUP: tl.constexpr,
                         D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         PAGE: tl.constexpr, DYN: tl.constexpr, MAX_KEYS: tl.constexpr,
                         HAS_GROUP: tl.constexpr):
    # With HAS_GROUP (APE), splits [0, S) cover the keys outside the sequence's context range
    # [CS, CE) — a virtual index i maps to key i, or i + (CE - CS) past CS — and splits
    # [S, 2S) cover the context keys, with the logit scale divided by its temperature.
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    sid = tl.program_id(2)
    n_split = S
    rows = tl.arange(0, BLOCK_M)
    rmask = rows < GROUP
    qh = kvh * GROUP + rows
    offs_d = tl.arange(0, D)
    q = tl.load(Q + b * s_qb + qh[:, None] * s_qh + offs_d[None, :], mask=rmask[:, None],
                other=0.0)
    n = tl.load(LENS + b)
    qk_scale = scale * 1.4426950408889634
    part = sid
    base_key = 0
    cs = 0
    skip = 0
    if HAS_GROUP:  # resolved at compile time
        cs = tl.load(CS + b)
        width = tl.load(CE + b) - cs
        is_ctx = sid >= S
        part = tl.where(is_ctx, sid - S, sid)
        base_key = tl.where(is_ctx, cs, 0)
        skip = tl.where(is_ctx, 0, width)
        n = tl.where(is_ctx, width, n - width)
        qk_scale = tl.where(is_ctx, qk_scale / tl.load(TEMP + b), qk_scale)
    per = tl.cdiv(tl.cdiv(n, n_split), BLOCK_N) * BLOCK_N
    lo = part * per
    hi = tl.minimum(lo + per, n)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    if DYN:
        start = lo
        stop = hi
    else:  # the interpreter loops to a constant bound; the masks do the rest
        start = 0
        stop = MAX_KEYS
    for s0 in range(start, stop, BLOCK_N):
        offs_n = s0 + tl.arange(0, BLOCK_N)
        nmask = (offs_n >= lo) & (offs_n < hi)
        key = base_key + offs_n
        if HAS_GROUP:
            key = tl.where(key >= cs, key + skip, key)
        page = tl.load(TABLES + b * s_tb + key // PAGE, mask=nmask, other=0)
        slot = page.to(tl.int64) * PAGE + key % PAGE
        k = tl.load(K + kvh * s_kh + slot[:, None] * s_kt + offs_d[None, :],
                    mask=nmask[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + kvh * s_vh + slot[:, None] * s_vt + offs_d[None, :],
                    mask=nmask[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    base = (sid * B + b).to(tl.int64) * Hq + qh  # partials are [S, B, Hq, (D)]
    _store_partial(OP, LP, base, acc, l_i, m_i, rmask, D)


_GROUPS: dict = {}


def decode_splits(batch: int, kv_heads: int, device) -> int:
    """Key splits per sequence so that about two waves of programs fill the GPU."""
    want = -(-2 * _sm_count(device) // max(1, batch * kv_heads))
    return int(max(1, min(64, want)))


def paged_decode_attention(q: Tensor, K: Tensor, V: Tensor, block_tables: Tensor,
                           seq_lens: Tensor, block_size: int, scale: float,
                           n_split: int | None = None, max_keys: int = 0,
                           groups: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
                           ) -> Tensor:
    """See ``reference.paged_decode_attention_ref``: q [B, Hq, D], K/V [Hkv, slots, D],
    block_tables [B, W] int32, seq_lens [B] int32. Returns [B, Hq, D]. ``groups`` = APE's
    per-sequence (context start, end (int32), temperature, log scale (fp32)); a sequence
    without contexts has start = end. ``max_keys`` bounds the key loop under the interpreter
    (CPU tests) only."""
    bsz, hq, d = q.shape
    hkv = K.shape[0]
    group = hq // hkv
    out = torch.empty_like(q)
    if bsz == 0:
        return out
    cuda = q.device.type == "cuda"
    S = n_split or decode_splits(bsz, hkv, q.device)
    G = 2 if groups is not None else 1
    op = torch.empty(G * S, bsz, hq, d, dtype=torch.float32, device=q.device)
    lp = torch.empty(G * S, bsz, hq, dtype=torch.float32, device=q.device)
    BLOCK_M = max(16, triton.next_power_of_2(group))
    BLOCK_N = 64 if cuda else 16
    if not cuda and not max_keys:
        max_keys = block_tables.shape[1] * block_size
    cs, ce, temp, logs = groups if groups is not None else (seq_lens, seq_lens, None, None)
    _paged_decode_kernel[(bsz, hkv, G * S)](
        q, K, V, op, lp, block_tables, seq_lens, cs, ce, temp if temp is not None else q,
        float(scale), bsz, hq, q.stride(0), q.stride(1), K.stride(0), K.stride(1), V.stride(0),
        V.stride(1), block_tables.stride(0), S, GROUP=group, D=d, BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N, PAGE=block_size, DYN=cuda, MAX_KEYS=max_keys,
        HAS_GROUP=groups is not None, num_warps=4 if cuda else 1, num_stages=2 if cuda else 1)
    key = (str(q.device), S, G)
    grp = _GROUPS.get(key)
    if grp is None:
        grp = _GROUPS[key] = torch.arange(G * S, device=q.device, dtype=torch.int32) // S
    n_rows = bsz * hq
    BLOCK = 16 if cuda else 8
    if groups is None:
        _combine_kernel[(triton.cdiv(n_rows, BLOCK),)](
            op, lp, grp, out, n_rows, S, out.stride(0), out.stride(1), hq, 1.0, 0.0,
            HAS_GROUP=False, D=d, BLOCK=BLOCK)
    else:
        _combine_kernel[(triton.cdiv(n_rows, BLOCK),)](
            op, lp, grp, out, n_rows, G * S, out.stride(0), out.stride(1), hq, temp, logs,
            HAS_GROUP=True, D=d, BLOCK=BLOCK, PER_QUERY=True)
    return out
