"""Per-layer kernels of the reuse loop: RoPE (shift of cached keys; Q/K rotation with scatter
into the cache), residual + RMSNorm, SwiGLU, K/V deviation, row scatter."""

from __future__ import annotations

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


@triton.jit(do_not_specialize=['n_rows', 'T'])
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
@triton.jit(do_not_specialize=['T'])
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
@triton.jit(do_not_specialize=['T'])
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
@triton.jit(do_not_specialize=['n'])
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
