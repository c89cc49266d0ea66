"""Triton kernels for chunk-KV reuse. Each has a torch reference in ``reference.py``.

* ``rope_shift``          re-rotate cached keys by per-token position deltas, in place, batched
                          over layers and heads (one pass over the bytes, fp32 math).
* ``selective_attention`` flash-style attention of a gathered subset of queries over the whole
                          mixed K/V, causal by original positions, GQA, optional per-key bias,
                          online softmax with fp32 accumulation; key blocks past a query block's
                          last visible position are skipped when keys are position-sorted.
* ``kv_deviation``        per-token ‖ΔK‖² + ‖ΔV‖² summed over heads without materialising the
                          difference; top-k is then a [T]-vector topk.
* ``scatter_kv``          write recomputed K and V rows into the reused buffers at their indices
                          (one launch for both).

All run on CUDA, and on CPU under ``TRITON_INTERPRET=1`` (slow: tests use tiny shapes).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import triton
import triton.language as tl
from torch import Tensor


# ---------------------------------------------------------------------------- rope_shift
@triton.jit
def _rotate(x1, x2, pos, inv_freq, HALF: tl.constexpr):
    """RoPE rotation of the two halves of rows by ``pos`` (float32 math, rotate-half layout)."""
    j = tl.arange(0, HALF)
    ang = pos[:, None] * tl.load(inv_freq + j)[None, :]
    c = tl.cos(ang)
    s = tl.sin(ang)
    return x1 * c - x2 * s, x2 * c + x1 * s


@triton.jit
def _rope_shift_kernel(K, delta, inv_freq, n_rows, T, stride_row, stride_t,
                       HALF: tl.constexpr, BLOCK_T: tl.constexpr):
    row = tl.program_id(0)  # (layer, head) flattened
    tb = tl.program_id(1)
    t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < T
    j = tl.arange(0, HALF)
    d = tl.load(delta + t, mask=tmask, other=0).to(tl.float32)
    base = K + row * stride_row + t[:, None] * stride_t
    m = tmask[:, None]
    x1 = tl.load(base + j[None, :], mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF + j[None, :], mask=m, other=0.0).to(tl.float32)
    o1, o2 = _rotate(x1, x2, d, inv_freq, HALF)
    tl.store(base + j[None, :], o1.to(K.dtype.element_ty), mask=m)
    tl.store(base + HALF + j[None, :], o2.to(K.dtype.element_ty), mask=m)


def _row_stride(k: Tensor) -> int:
    """Stride between consecutive [T, D] planes when all leading dims flatten uniformly."""
    if k.dim() == 2:
        return 0
    for i in range(k.dim() - 4, -1, -1):
        if k.shape[i] > 1 and k.stride(i) != k.stride(i + 1) * k.shape[i + 1]:
            raise ValueError("rope_shift needs leading dims that flatten with one stride")
    return k.stride(-3)


def rope_shift(k: Tensor, delta: Tensor, inv_freq: Tensor) -> Tensor:
    """Rotate ``k`` [..., T, D] in place by ``delta`` [T]; returns ``k``.

    ``k`` may be a token slice of a bigger buffer (e.g. ``K[:, :, a:b]`` of [L, H, N, D]): the
    leading dims only need one uniform stride and the last dim must be contiguous.
    """
    T, D = k.shape[-2], k.shape[-1]
    if k.numel() == 0:
        return k
    if k.stride(-1) != 1:
        raise ValueError("rope_shift needs a contiguous last dimension")
    rows = k.numel() // (T * D)
    BLOCK_T = 32
    grid = (rows, triton.cdiv(T, BLOCK_T))
    _rope_shift_kernel[grid](k, delta.to(torch.int32).contiguous(),
                             inv_freq.to(torch.float32).contiguous(), rows, T, _row_stride(k),
                             k.stride(-2), HALF=D // 2, BLOCK_T=BLOCK_T)
    return k


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


@triton.jit
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


# ---------------------------------------------------------------------------- deviation
def kv_deviation(k_new: Tensor, v_new: Tensor, k_old: Tensor, v_old: Tensor) -> Tensor:
    """[T] fp32 deviation; new/old [H, T, D] with equal strides between K and V."""
    h, t, d = k_new.shape
    out = torch.empty(t, dtype=torch.float32, device=k_new.device)
    if t == 0:
        return out
    if k_new.stride() != v_new.stride() or k_new.stride(-1) != 1:
        k_new, v_new = k_new.contiguous(), v_new.contiguous()
    if k_old.stride() != v_old.stride() or k_old.stride(-1) != 1:
        k_old, v_old = k_old.contiguous(), v_old.contiguous()
    BLOCK_T = 32
    _kv_dev_at_kernel[(triton.cdiv(t, BLOCK_T),)](
        k_new, v_new, k_old, v_old, out, out, t, k_new.stride(0), k_new.stride(1),
        k_old.stride(0), k_old.stride(1), H=h, D=d, BLOCK_T=BLOCK_T, HAS_SLOTS=False)
    return out


# ---------------------------------------------------------------------------- scatter
@triton.jit
def _scatter_kernel(K, V, idx, KR, VR, n, s_h, s_t, r_h, r_t, D: tl.constexpr):
    i = tl.program_id(0)
    h = tl.program_id(1)
    d = tl.arange(0, D)
    dst = tl.load(idx + i)
    kr = tl.load(KR + h * r_h + i * r_t + d)
    vr = tl.load(VR + h * r_h + i * r_t + d)
    tl.store(K + h * s_h + dst * s_t + d, kr.to(K.dtype.element_ty))
    tl.store(V + h * s_h + dst * s_t + d, vr.to(V.dtype.element_ty))


def scatter_kv(K: Tensor, V: Tensor, index: Tensor, k_rows: Tensor, v_rows: Tensor) -> None:
    """K[:, index[i]] = k_rows[:, i] and the same for V, in one launch. K/V [H, T, D]."""
    n = index.numel()
    if n == 0:
        return
    h, _, d = K.shape
    assert K.stride() == V.stride(), "K and V buffers must share a layout"
    if k_rows.stride() != v_rows.stride() or k_rows.stride(-1) != 1:
        k_rows, v_rows = k_rows.contiguous(), v_rows.contiguous()
    _scatter_kernel[(n, h)](K, V, index.to(torch.int32).contiguous(), k_rows, v_rows, n,
                            K.stride(0), K.stride(1), k_rows.stride(0), k_rows.stride(1), D=d)


# ---------------------------------------------------------------------------- assembly
@triton.jit
def _assemble_kernel(K, V, OFF_K, OFF_V, SRC_T, SLOT_SRC, SLOT_TOK, SLOT_DELTA, inv_freq, N,
                     H, layer0, s_kl, s_kh, s_kt,
                     HALF: tl.constexpr, BLOCK_T: tl.constexpr, SHIFT: tl.constexpr):
    # Sources are separate [L, H, T_s, D] tensors anywhere in the (unified) address space; each
    # is reached as K/V + a per-source element offset, so one launch serves any number of them.
    pid_t = tl.program_id(0)
    lh = tl.program_id(1)
    layer = layer0 + lh // H
    head = lh % H
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tm = t < N
    sid = tl.load(SLOT_SRC + t, mask=tm, other=-1)
    have = tm & (sid >= 0)
    sid = tl.where(have, sid, 0)
    stok = tl.load(SLOT_TOK + t, mask=have, other=0).to(tl.int64)
    slen = tl.load(SRC_T + sid, mask=have, other=1).to(tl.int64)
    row = ((layer * H + head).to(tl.int64) * slen + stok) * (2 * HALF)
    ok = tl.load(OFF_K + sid, mask=have, other=0) + row
    ov = tl.load(OFF_V + sid, mask=have, other=0) + row
    j = tl.arange(0, HALF)
    m = have[:, None]
    x1 = tl.load(K + ok[:, None] + j[None, :], mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(K + ok[:, None] + HALF + j[None, :], mask=m, other=0.0).to(tl.float32)
    if SHIFT:
        d = tl.load(SLOT_DELTA + t, mask=have, other=0).to(tl.float32)
        o1, o2 = _rotate(x1, x2, d, inv_freq, HALF)
    else:
        o1 = x1
        o2 = x2
    dst = layer.to(tl.int64) * s_kl + head * s_kh + t.to(tl.int64) * s_kt
    sm = tm[:, None]
    tl.store(K + dst[:, None] + j[None, :], o1.to(K.dtype.element_ty), mask=sm)
    tl.store(K + dst[:, None] + HALF + j[None, :], o2.to(K.dtype.element_ty), mask=sm)
    y1 = tl.load(V + ov[:, None] + j[None, :], mask=m, other=0.0)
    y2 = tl.load(V + ov[:, None] + HALF + j[None, :], mask=m, other=0.0)
    tl.store(V + dst[:, None] + j[None, :], y1, mask=sm)
    tl.store(V + dst[:, None] + HALF + j[None, :], y2, mask=sm)


def source_offsets(K: Tensor, V: Tensor, sources) -> tuple[list[int], list[int], list[int]]:
    """Element offsets of each source's K and V from ``K`` / ``V`` (host ints) and lengths."""
    esz = K.element_size()
    bk, bv = K.data_ptr(), V.data_ptr()
    ok, ov, ln = [], [], []
    for k, v in sources:
        dk, dv = k.data_ptr() - bk, v.data_ptr() - bv
        if dk % esz or dv % esz or k.dtype != K.dtype or v.dtype != V.dtype:
            raise ValueError("assembly sources must share the buffer's dtype and alignment")
        ok.append(dk // esz)
        ov.append(dv // esz)
        ln.append(k.shape[2])
    return ok, ov, ln


def assemble_kv(K: Tensor, V: Tensor, tables: Tensor, n_slots: int, inv_freq: Tensor,
                shift: bool, layers: tuple[int, int] | None = None) -> None:
    """Fill slots 0..n_slots-1 of K/V [L, H, Nb, D] from chunk sources in one launch.

    ``tables`` (device int64) packs, in order: per-source K offsets, V offsets and lengths
    (S each, from ``source_offsets``), then per-slot source id, source token and position delta
    (n_slots each) — one host→device copy carries the whole plan. ``layers`` = (first, count)
    restricts the launch to a range of layers (layer-wise loading).
    """
    L, H, _, D = K.shape
    if n_slots == 0:
        return
    assert K.stride() == V.stride() and K.stride(-1) == 1
    s = (tables.numel() - 3 * n_slots) // 3
    off_k, off_v, src_t = tables[:s], tables[s:2 * s], tables[2 * s:3 * s]
    slot = tables[3 * s:]
    first, count = layers if layers is not None else (0, L)
    BLOCK_T = 16 if K.device.type == "cpu" else 32
    grid = (triton.cdiv(n_slots, BLOCK_T), count * H)
    _assemble_kernel[grid](K, V, off_k, off_v, src_t, slot[:n_slots], slot[n_slots:2 * n_slots],
                           slot[2 * n_slots:], inv_freq, n_slots, H, first, K.stride(0),
                           K.stride(1), K.stride(2), HALF=D // 2, BLOCK_T=BLOCK_T, SHIFT=shift)


# ---------------------------------------------------------------------------- norm / MLP
@triton.jit
def _add_rms_kernel(Hs, R, W, X, n_cols, s_h, s_r, s_x, eps, HAS_R: tl.constexpr,
                    BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    m = c < n_cols
    h = tl.load(Hs + row * s_h + c, mask=m, other=0.0)
    if HAS_R:
        r = tl.load(R + row * s_r + c, mask=m, other=0.0)
        h = (h.to(tl.float32) + r.to(tl.float32)).to(Hs.dtype.element_ty)
        tl.store(Hs + row * s_h + c, h, mask=m)
    hf = h.to(tl.float32)
    var = tl.sum(hf * hf, 0) / n_cols
    w = tl.load(W + c, mask=m, other=0.0).to(tl.float32)
    y = hf * tl.rsqrt(var + eps) * w
    tl.store(X + row * s_x + c, y.to(X.dtype.element_ty), mask=m)


def add_rms_norm(h: Tensor, r: Tensor | None, w: Tensor, eps: float) -> Tensor:
    """``h += r`` in place (one rounding), then RMSNorm(h)·w, in one pass over the rows."""
    t, n = h.shape
    x = torch.empty_like(h)
    if t == 0:
        return x
    assert h.stride(-1) == 1 and (r is None or r.stride(-1) == 1)
    BLOCK = triton.next_power_of_2(n)
    _add_rms_kernel[(t,)](h, r if r is not None else h, w, x, n, h.stride(0),
                          r.stride(0) if r is not None else 0, x.stride(0), eps,
                          HAS_R=r is not None, BLOCK=BLOCK,
                          num_warps=8 if BLOCK >= 4096 else 4)
    return x


@triton.jit
def _silu_mul_kernel(GU, O, n, s_g, s_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = c < n
    g = tl.load(GU + row * s_g + c, mask=m, other=0.0).to(tl.float32)
    u = tl.load(GU + row * s_g + n + c, mask=m, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(O + row * s_o + c, y.to(O.dtype.element_ty), mask=m)


def silu_mul(gu: Tensor) -> Tensor:
    """SwiGLU: ``silu(gu[:, :I]) · gu[:, I:]`` for the fused gate/up output [T, 2I]."""
    t, two_i = gu.shape
    i = two_i // 2
    out = torch.empty(t, i, dtype=gu.dtype, device=gu.device)
    if t == 0:
        return out
    BLOCK = 1024 if gu.device.type == "cuda" else 64
    _silu_mul_kernel[(t, triton.cdiv(i, BLOCK))](gu, out, i, gu.stride(0), out.stride(0),
                                                 BLOCK=BLOCK)
    return out


# ---------------------------------------------------------------------------- RoPE on Q/K/V
@triton.jit
def _rope_qkv_kernel(QKV, POS, inv_freq, K, V, SLOTS, T, s_row, HQ, HKV, s_kh, s_kt, scaling,
                     HALF: tl.constexpr, BLOCK_T: tl.constexpr, SCATTER: tl.constexpr,
                     SCALE: tl.constexpr):
    pid_t = tl.program_id(0)
    head = tl.program_id(1)  # 0..HQ-1 query heads, then HKV key heads
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tm = t < T
    m = tm[:, None]
    j = tl.arange(0, HALF)
    p = tl.load(POS + t, mask=tm, other=0).to(tl.float32)
    base = QKV + t.to(tl.int64)[:, None] * s_row + head * (2 * HALF)
    x1 = tl.load(base + j[None, :], mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF + j[None, :], mask=m, other=0.0).to(tl.float32)
    o1, o2 = _rotate(x1, x2, p, inv_freq, HALF)
    if SCALE:
        o1 = o1 * scaling
        o2 = o2 * scaling
    o1 = o1.to(QKV.dtype.element_ty)
    o2 = o2.to(QKV.dtype.element_ty)
    tl.store(base + j[None, :], o1, mask=m)
    tl.store(base + HALF + j[None, :], o2, mask=m)
    if SCATTER:
        if head >= HQ:
            kvh = head - HQ
            slot = tl.load(SLOTS + t, mask=tm, other=0).to(tl.int64)
            dst = kvh * s_kh + slot * s_kt
            tl.store(K + dst[:, None] + j[None, :], o1.to(K.dtype.element_ty), mask=m)
            tl.store(K + dst[:, None] + HALF + j[None, :], o2.to(K.dtype.element_ty), mask=m)
            vb = QKV + t.to(tl.int64)[:, None] * s_row + (HQ + HKV + kvh) * (2 * HALF)
            v1 = tl.load(vb + j[None, :], mask=m, other=0.0)
            v2 = tl.load(vb + HALF + j[None, :], mask=m, other=0.0)
            tl.store(V + dst[:, None] + j[None, :], v1.to(V.dtype.element_ty), mask=m)
            tl.store(V + dst[:, None] + HALF + j[None, :], v2.to(V.dtype.element_ty), mask=m)


def rope_qkv(qkv: Tensor, pos: Tensor, inv_freq: Tensor, hq: int, hkv: int,
             scaling: float = 1.0, K: Tensor | None = None, V: Tensor | None = None,
             slots: Tensor | None = None) -> None:
    """Rotate the Q and K heads of fused rows ``qkv`` [T, (Hq+2Hkv)·D] in place to ``pos``
    (int32, [T]); with ``K``/``V`` [Hkv, N, D] and ``slots`` [T], also write each row's rotated
    K and its V into those buffers at its slot (RoPE + scatter in one launch)."""
    t = qkv.shape[0]
    if t == 0:
        return
    d = qkv.shape[1] // (hq + 2 * hkv)
    assert qkv.stride(-1) == 1
    scatter = K is not None
    BLOCK_T = 16
    _rope_qkv_kernel[(triton.cdiv(t, BLOCK_T), hq + hkv)](
        qkv, pos, inv_freq, K if scatter else qkv, V if scatter else qkv,
        slots if scatter else pos, t, qkv.stride(0), hq, hkv,
        K.stride(0) if scatter else 0, K.stride(1) if scatter else 0, scaling,
        HALF=d // 2, BLOCK_T=BLOCK_T, SCATTER=scatter, SCALE=scaling != 1.0)


# ---------------------------------------------------------------------------- deviation at slots
@triton.jit
def _kv_dev_at_kernel(KN, VN, KO, VO, SLOTS, out, T, s_nh, s_nt, s_oh, s_ot,
                      H: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr,
                      HAS_SLOTS: tl.constexpr):
    # per row: ‖ΔK‖² + ‖ΔV‖² over heads; the cached row is ``SLOTS[t]`` (or ``t``)
    tb = tl.program_id(0)
    t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < T
    d = tl.arange(0, D)
    if HAS_SLOTS:
        slot = tl.load(SLOTS + t, mask=tmask, other=0).to(tl.int64)
    else:
        slot = t.to(tl.int64)
    acc = tl.zeros([BLOCK_T], tl.float32)
    m = tmask[:, None]
    tn = t.to(tl.int64)
    for h in range(0, H):
        kn = tl.load(KN + h * s_nh + tn[:, None] * s_nt + d[None, :], mask=m, other=0.0)
        ko = tl.load(KO + h * s_oh + slot[:, None] * s_ot + d[None, :], mask=m, other=0.0)
        vn = tl.load(VN + h * s_nh + tn[:, None] * s_nt + d[None, :], mask=m, other=0.0)
        vo = tl.load(VO + h * s_oh + slot[:, None] * s_ot + d[None, :], mask=m, other=0.0)
        dk = kn.to(tl.float32) - ko.to(tl.float32)
        dv = vn.to(tl.float32) - vo.to(tl.float32)
        acc += tl.sum(dk * dk + dv * dv, 1)
    tl.store(out + t, acc, mask=tmask)


def kv_deviation_at(k_new: Tensor, v_new: Tensor, K: Tensor, V: Tensor, slots: Tensor) -> Tensor:
    """[T] fp32 deviation of fresh rows [H, T, D] from the cached rows ``K[:, slots]``; reads
    the cache in place (no gathered copy)."""
    h, t, d = k_new.shape
    out = torch.empty(t, dtype=torch.float32, device=k_new.device)
    if t == 0:
        return out
    assert k_new.stride() == v_new.stride() and K.stride() == V.stride()
    BLOCK_T = 32
    _kv_dev_at_kernel[(triton.cdiv(t, BLOCK_T),)](
        k_new, v_new, K, V, slots, out, t, k_new.stride(0), k_new.stride(1), K.stride(0),
        K.stride(1), H=h, D=d, BLOCK_T=BLOCK_T, HAS_SLOTS=True)
    return out


# ---------------------------------------------------------------------------- split-K attention
@triton.jit
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
    offs_d = tl.arange(0, D)
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
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    base = (sid * Tq + qi).to(tl.int64) * Hq + qh  # partials are [S, Tq, Hq, (D)]
    tl.store(OP + base[:, None] * D + offs_d[None, :], out, mask=mmask[:, None])
    tl.store(LP + base, lse, mask=mmask)


@triton.jit
def _combine_kernel(OP, LP, SGRP, O, n_rows, S, sot, soh, Hq, temperature, log_scale,
                    HAS_GROUP: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
    # Rows are (query, head) pairs. Splits of group 0 (or all) merge by log-sum-exp; with
    # HAS_GROUP, group-1 splits (APE's contexts) merge apart and the two terms combine as
    # softmax([LSE_other, T·LSE_ctx + log S]) in the natural-log domain.
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rm = r < n_rows
    offs_d = tl.arange(0, D)
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
