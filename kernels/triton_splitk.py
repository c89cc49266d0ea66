"""Split-K attention for query sets too small to fill the GPU, and APE's two-group form:
partial softmaxes over key ranges, merged by log-sum-exp."""

from __future__ import annotations

from collections import OrderedDict

import torch
import triton
import triton.language as tl
from torch import Tensor

from ctxcache.kernels.triton_attention import (
    _attention_out, _attn_block, _blocks, _config, _query_tile, _tile_m, attention_plan,
)

# ---------------------------------------------------------------------------- split-K attention
@triton.jit(do_not_specialize=['Tq'])
def _split_attn_kernel(Q, K, V, OP, LP, qpos, kpos, kv_hi, SLO, SHI, SSCALE, Tq, Hq,
                       sqh, sqt, skh, skt, svh, svt,
                       GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, DYN: tl.constexpr, TK_CONST: tl.constexpr):
    # One (query tile, K/V head, key split): a partial softmax over keys [lo, hi) of the
    # split, written normalised with its log2-sum-exp for ``_combine_kernel``.
    pid_m = tl.program_id(0)
    kvh = tl.program_id(1)
    sid = tl.program_id(2)
    qi, qh, mmask, q, qp = _query_tile(Q, qpos, pid_m, kvh, Tq, sqh, sqt, GROUP, D, BLOCK_M)
    lo = tl.load(SLO + sid)
    hi = tl.minimum(tl.load(SHI + sid), tl.load(kv_hi + pid_m))
    qk_scale = tl.load(SSCALE + sid) * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    if DYN:
        for start_n in range(lo, hi, BLOCK_N):
            m_i, l_i, acc = _attn_block(start_n, q, qp, m_i, l_i, acc, K, V, kpos, kpos, lo, hi,
                                        kvh, skh, skt, svh, svt, qk_scale, False, D, BLOCK_N)
    else:  # the interpreter loops to a constant bound; the masks do the rest
        for start_n in range(0, TK_CONST, BLOCK_N):
            m_i, l_i, acc = _attn_block(start_n, q, qp, m_i, l_i, acc, K, V, kpos, kpos, lo, hi,
                                        kvh, skh, skt, svh, svt, qk_scale, False, D, BLOCK_N)
    base = (sid * Tq + qi).to(tl.int64) * Hq + qh  # partials are [S, Tq, Hq, (D)]
    _store_partial(OP, LP, base, acc, l_i, m_i, mmask, D)


@triton.jit
def _store_partial(OP, LP, base, acc, l_i, m_i, mask, D: tl.constexpr):
    """A split's normalised partial output and its log2-sum-exp (-inf where it saw no key),
    at rows ``base`` of the [splits, queries, heads] partials the combine kernel reads."""
    offs_d = tl.arange(0, D)
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    tl.store(OP + base[:, None] * D + offs_d[None, :], out, mask=mask[:, None])
    tl.store(LP + base, lse, mask=mask)


@triton.jit(do_not_specialize=['n_rows', 'S'])
def _combine_kernel(OP, LP, SGRP, O, n_rows, S, sot, soh, Hq, temperature, log_scale,
                    HAS_GROUP: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
                    PER_QUERY: tl.constexpr = False):
    # Rows are (query, head) pairs. Splits of group 0 (or all) merge by log-sum-exp; with
    # HAS_GROUP, group-1 splits (APE's contexts) merge apart and the two terms combine as
    # softmax([LSE_other, T·LSE_ctx + log S]) in the natural-log domain. With PER_QUERY,
    # ``temperature`` and ``log_scale`` are arrays indexed by query (paged decode: one
    # sequence per query, each with its own APE adjustment or none).
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rm = r < n_rows
    offs_d = tl.arange(0, D)
    if PER_QUERY:
        temperature = tl.load(temperature + r // Hq, mask=rm, other=1.0)
        log_scale = tl.load(log_scale + r // Hq, mask=rm, other=0.0)
    ln2 = 0.6931471805599453
    m0 = tl.full([BLOCK], float("-inf"), tl.float32)
    m1 = tl.full([BLOCK], float("-inf"), tl.float32)
    for s in range(0, S):  # pass 1: the maximum of each group
        lse = tl.load(LP + s * n_rows + r, mask=rm, other=float("-inf"))
        g = tl.load(SGRP + s)
        if HAS_GROUP:
            m0 = tl.where(g == 0, tl.maximum(m0, lse), m0)
            m1 = tl.where(g == 1, tl.maximum(m1, lse), m1)
        else:
            m0 = tl.maximum(m0, lse)
    m0s = tl.where(m0 == float("-inf"), 0.0, m0)
    m1s = tl.where(m1 == float("-inf"), 0.0, m1)
    l0 = tl.zeros([BLOCK], tl.float32)
    l1 = tl.zeros([BLOCK], tl.float32)
    a0 = tl.zeros([BLOCK, D], tl.float32)
    a1 = tl.zeros([BLOCK, D], tl.float32)
    for s in range(0, S):  # pass 2: weighted sums within each group
        lse = tl.load(LP + s * n_rows + r, mask=rm, other=float("-inf"))
        o = tl.load(OP + (s * n_rows + r).to(tl.int64)[:, None] * D + offs_d[None, :],
                    mask=rm[:, None], other=0.0)
        g = tl.load(SGRP + s)
        if HAS_GROUP:
            w0 = tl.where(g == 0, tl.exp2(lse - m0s), 0.0)
            w1 = tl.where(g == 1, tl.exp2(lse - m1s), 0.0)
            l1 += w1
            a1 += w1[:, None] * o
        else:
            w0 = tl.exp2(lse - m0s)
        l0 += w0
        a0 += w0[:, None] * o
    o0 = a0 / tl.where(l0 == 0.0, 1.0, l0)[:, None]
    if HAS_GROUP:
        o1 = a1 / tl.where(l1 == 0.0, 1.0, l1)[:, None]
        # natural-log LSE of each term; APE weighs the context term by T·LSE + log S
        e0 = tl.where(l0 == 0.0, float("-inf"), (m0s + tl.log2(tl.where(l0 == 0.0, 1.0, l0)))
                      * ln2)
        e1 = tl.where(l1 == 0.0, float("-inf"), temperature * (
            m1s + tl.log2(tl.where(l1 == 0.0, 1.0, l1))) * ln2 + log_scale)
        mx = tl.maximum(e0, e1)
        mx = tl.where(mx == float("-inf"), 0.0, mx)
        w0 = tl.exp(e0 - mx)
        w1 = tl.exp(e1 - mx)
        den = tl.where(w0 + w1 == 0.0, 1.0, w0 + w1)
        out = (w0[:, None] * o0 + w1[:, None] * o1) / den[:, None]
    else:
        out = o0
    qi = r // Hq
    qh = r % Hq
    tl.store(O + qi.to(tl.int64)[:, None] * sot + qh[:, None] * soh + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=rm[:, None])


def _sm_count(device) -> int:
    if device.type != "cuda":
        return 8
    key = ("sm", device.index)
    n = _CACHE.get(key)
    if n is None:
        n = _CACHE[key] = torch.cuda.get_device_properties(device).multi_processor_count
    return n


_CACHE: dict = {}


def key_splits(tk: int, n_programs: int, device, block_n: int,
               group: tuple[int, int] | None = None) -> list[tuple[int, int, int]]:
    """Key ranges (lo, hi, is_context) so that about two waves of programs fill the GPU. With a
    context group (APE), no range crosses the group's boundaries."""
    want = max(1, -(-2 * _sm_count(device) // max(n_programs, 1)))
    spans = [(0, tk, 0)] if group is None else [
        (a, b, g) for a, b, g in ((0, group[0], 0), (group[0], group[1], 1), (group[1], tk, 0))
        if b > a]
    per = max(block_n * 4, -(-tk // want))
    per = -(-per // block_n) * block_n
    out = []
    for a, b, g in spans:
        for lo in range(a, b, per):
            out.append((lo, min(b, lo + per), g))
    return out or [(0, 0, 0)]


_SPLIT_TABLES: "OrderedDict[tuple, tuple]" = OrderedDict()


def _split_table(device, tk: int, n_programs: int, block_n: int, scale: float,
                 context: tuple[int, int, float] | None) -> tuple:
    """The key-split table on the device, built once per shape and kept: a layer loop (and a
    captured CUDA graph) reuses it without any host→device copy."""
    key = (str(device), tk, n_programs, block_n, scale, context)
    hit = _SPLIT_TABLES.get(key)
    if hit is not None:
        _SPLIT_TABLES.move_to_end(key)
        return hit
    splits = key_splits(tk, n_programs, device, block_n, None if context is None else context[:2])
    temp = 1.0 if context is None else context[2]
    host = torch.tensor([[a for a, _, _ in splits], [b for _, b, _ in splits],
                         [g for _, _, g in splits]], dtype=torch.int32)
    scales = torch.tensor([scale / temp if g else scale for _, _, g in splits],
                          dtype=torch.float32)
    host, scales = host.to(device), scales.to(device)
    out = (host[0], host[1], scales, host[2], len(splits))
    _SPLIT_TABLES[key] = out
    while len(_SPLIT_TABLES) > 512:
        _SPLIT_TABLES.popitem(last=False)
    return out


def split_plan(q_pos: Tensor, k_pos: Tensor, head_dim: int, group_size: int,
               scale: float, k_sorted: bool = True,
               context: tuple[int, int, float] | None = None) -> tuple:
    """``attention_plan`` plus a key-split table for the split-K kernel: used when the query
    set is too small to fill the GPU (naive reuse, the question of a RAG prompt, decoding)
    and for APE's two-group attention (``context`` = (start, end, temperature))."""
    qp, kp, bounds = attention_plan(q_pos, k_pos, head_dim,
                                    k_sorted if context is None else False, group_size)
    bn = _blocks(head_dim, q_pos.device.type)[1]
    table = _split_table(q_pos.device, k_pos.numel(), bounds.numel() // 2, bn, float(scale),
                         context)
    return qp, kp, bounds, table


def split_attention(q: Tensor, k: Tensor, v: Tensor, plan, log_scale: float | None = None,
                    temperature: float = 1.0) -> Tensor:
    """Split-K form of ``selective_attention`` (``plan`` from ``split_plan``). With
    ``log_scale`` the splits marked as context combine with APE's adjustment."""
    hq, tq, d, hkv, tk, group, out = _attention_out(q, k)
    if tq == 0:
        return out
    qp, kp, bounds, (slo, shi, sscale, sgrp, n_split) = plan
    hi = bounds[:bounds.numel() // 2]
    BLOCK_N = _blocks(d, q.device.type)[1]
    BLOCK_M = _tile_m(d, q.device.type, group)
    op = torch.empty(n_split, tq, hq, d, dtype=torch.float32, device=q.device)
    lp = torch.empty(n_split, tq, hq, dtype=torch.float32, device=q.device)
    cuda = q.device.type == "cuda"
    _split_attn_kernel[(hi.numel(), hkv, n_split)](
        q, k, v, op, lp, qp, kp, hi, slo, shi, sscale, tq, hq,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        GROUP=group, D=d, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, DYN=cuda,
        TK_CONST=0 if cuda else tk, num_warps=4 if cuda else 1,
        num_stages=_config(d)["num_stages"] if cuda else 1)
    n_rows = tq * hq
    BLOCK = 16 if cuda else 8
    t_out = out.permute(1, 0, 2)  # [Tq, Hq, D] storage
    _combine_kernel[(triton.cdiv(n_rows, BLOCK),)](
        op, lp, sgrp, t_out, n_rows, n_split, t_out.stride(0), t_out.stride(1), hq,
        float(temperature), float(log_scale if log_scale is not None else 0.0),
        HAS_GROUP=log_scale is not None, D=d, BLOCK=BLOCK)
    return out
