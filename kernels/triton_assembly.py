"""Assembly of a prompt's K/V from cached chunk spans in one launch."""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from ctxcache.kernels.triton_layer import _rotate


# ---------------------------------------------------------------------------- assembly
@triton.jit(do_not_specialize=['N'])
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
