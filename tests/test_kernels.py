"""Triton kernels vs their torch references (CPU through TRITON_INTERPRET=1, tiny shapes).

Tolerances: float32 inputs — 1e-5 absolute (rope, scatter exact); attention 1e-4 (online vs
direct softmax); float16 inputs — 2e-3 (one rounding of the output). The full-size checks run
on the GPU machine (``benchmarks/kernels_gpu.py``) with their results committed.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("set TRITON_INTERPRET=1 before triton is imported (conftest does)",
                allow_module_level=True)

from ctxcache.kernels import TORCH_OPS, get_ops  # noqa: E402
from ctxcache.kernels.reference import (  # noqa: E402
    kv_deviation_ref, rope_shift_ref, scatter_kv_ref, selective_attention_ref, topk_ref,
)

OPS = get_ops("triton")
G = torch.Generator().manual_seed(0)


def rnd(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=G).to(dtype)


def inv_freq(d, theta=10000.0):
    return 1.0 / (theta ** (torch.arange(0, d, 2).float() / d))


@pytest.mark.parametrize("shape", [(1, 1, 1, 16), (2, 3, 37, 16), (3, 2, 65, 32), (1, 4, 0, 16)])
def test_rope_shift(shape):
    k = rnd(*shape)
    delta = torch.randint(-100, 5000, (shape[2],), generator=G)
    ref = rope_shift_ref(k, delta, inv_freq(shape[3]))
    out = OPS.rope_shift(k.clone(), delta, inv_freq(shape[3]))
    assert (ref - out).abs().max().item() <= 1e-5 if k.numel() else out.numel() == 0


def test_rope_shift_on_a_token_slice_in_place():
    buf = rnd(2, 3, 50, 16)
    before = buf.clone()
    delta = torch.full((20,), 7)
    OPS.rope_shift(buf[:, :, 10:30], delta, inv_freq(16))
    assert torch.allclose(buf[:, :, 10:30], rope_shift_ref(before[:, :, 10:30], delta,
                                                           inv_freq(16)), atol=1e-5)
    assert torch.equal(buf[:, :, :10], before[:, :, :10])
    assert torch.equal(buf[:, :, 30:], before[:, :, 30:])


@pytest.mark.parametrize("hq,hkv,tq,tk,d", [
    (4, 2, 5, 37, 16), (4, 4, 1, 20, 32), (6, 2, 33, 70, 16), (2, 1, 0, 10, 16),
    (8, 1, 17, 17, 64), (3, 3, 40, 129, 16)])
@pytest.mark.parametrize("bias", [False, True])
def test_selective_attention(hq, hkv, tq, tk, d, bias):
    q, k, v = rnd(hq, tq, d), rnd(hkv, tk, d), rnd(hkv, tk, d)
    kp = torch.arange(tk)
    qp = torch.sort(torch.randint(0, tk, (tq,), generator=G)).values
    b = rnd(tk) if bias else None
    ref = selective_attention_ref(q, k, v, qp, kp, d ** -0.5, b)
    out = OPS.selective_attention(q, k, v, qp, kp, d ** -0.5, b)
    fallback = TORCH_OPS.selective_attention(q, k, v, qp, kp, d ** -0.5, b)
    assert out.shape == ref.shape == (hq, tq, d)
    if tq:
        assert (ref - out).abs().max().item() <= 1e-4
        assert (ref - fallback).abs().max().item() <= 1e-4


def test_selective_attention_unsorted_positions_and_fp16():
    # APE layouts repeat positions: keys are not sorted
    hq, hkv, d = 4, 2, 16
    kp = torch.cat([torch.arange(10), torch.arange(3, 15), torch.arange(3, 9)])
    qp = torch.tensor([15, 16, 17])
    q, k, v = rnd(hq, 3, d), rnd(hkv, kp.numel(), d), rnd(hkv, kp.numel(), d)
    ref = selective_attention_ref(q, k, v, qp, kp, 0.25)
    assert (OPS.selective_attention(q, k, v, qp, kp, 0.25) - ref).abs().max().item() <= 1e-4
    h = [x.half() for x in (q, k, v)]
    out16 = OPS.selective_attention(*h, qp, kp, 0.25)
    assert out16.dtype == torch.float16
    assert (out16.float() - ref).abs().max().item() <= 2e-3


def test_query_that_sees_no_key_gets_zeros():
    q, k, v = rnd(2, 1, 16), rnd(2, 4, 16), rnd(2, 4, 16)
    out = OPS.selective_attention(q, k, v, torch.tensor([2]), torch.tensor([5, 6, 7, 8]), 0.25)
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize("h,t,d", [(1, 1, 16), (3, 41, 16), (8, 130, 32), (2, 0, 16)])
def test_kv_deviation_and_topk(h, t, d):
    kn, vn, ko, vo = (rnd(h, t, d) for _ in range(4))
    ref = kv_deviation_ref(kn, vn, ko, vo)
    out = OPS.kv_deviation(kn, vn, ko, vo)
    assert out.shape == (t,)
    if t:
        assert torch.allclose(out, ref, rtol=1e-5, atol=1e-4)
        k = max(1, t // 7)
        assert set(topk_ref(out, k).tolist()) == set(topk_ref(ref, k).tolist())


@pytest.mark.parametrize("n", [0, 1, 5])
def test_scatter_kv(n):
    K, V = torch.zeros(3, 20, 16), torch.zeros(3, 20, 16)
    idx = torch.randperm(20, generator=G)[:n]
    kr, vr = rnd(3, n, 16), rnd(3, n, 16)
    K2, V2 = K.clone(), V.clone()
    scatter_kv_ref(K2, V2, idx, kr, vr)
    OPS.scatter_kv(K, V, idx, kr, vr)
    assert torch.equal(K, K2) and torch.equal(V, V2)


def test_cacheblend_with_triton_kernels_matches_torch_kernels():
    """The whole selective-recompute path on the Triton ops equals the torch ops."""
    from ctxcache.engine import Engine
    from ctxcache.fusion import CacheBlend, FullPrefill, FusionContext, Segment
    from ctxcache.kv import KVStore, MemoryTier

    outs = {}
    for backend in ("torch", "triton"):
        eng = Engine.load("random:tiny-llama", kernels=backend)
        ctx = FusionContext(eng, KVStore([MemoryTier(1 << 26)]))
        g = torch.Generator().manual_seed(3)
        ids = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (6, 11, 9, 5)]
        segs = [Segment.prefix(ids[0]), Segment.chunk(ids[1]), Segment.chunk(ids[2]),
                Segment.text(ids[3])]
        outs[backend] = (CacheBlend(0.3).build(ctx, segs), CacheBlend(1.0).build(ctx, segs),
                         FullPrefill().build(ctx, segs))
    for a, b in zip(outs["torch"], outs["triton"]):
        assert (a.logits - b.logits).abs().max().item() <= 1e-4
        assert (a.kv.k - b.kv.k).abs().max().item() <= 1e-4
    full = outs["triton"][2]
    assert (outs["triton"][1].logits - full.logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("hq,hkv", [(6, 2), (7, 1), (8, 2)])
def test_attention_plan_bounds_cover_every_visible_key(hq, hkv):
    """The per-tile key bound (used on GPU to skip blocks) never cuts a visible key."""
    from ctxcache.kernels.triton_ops import _tile_m, attention_plan

    tq, tk, d = 45, 300, 16
    qp = torch.sort(torch.randperm(tk, generator=G)[:tq]).values
    kp = torch.arange(tk)
    group = hq // hkv
    _, _, hi = attention_plan(qp, kp, d, True, group)
    bm = _tile_m(d, "cpu", group)
    assert hi.numel() == -(-tq * group // bm)
    for j in range(hi.numel()):
        queries = {r // group for r in range(j * bm, (j + 1) * bm) if r // group < tq}
        need = max(int((kp <= qp[i]).sum()) for i in queries)
        assert int(hi[j]) >= need
