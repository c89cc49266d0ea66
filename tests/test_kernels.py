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
from ctxcache.kernels import triton_ops as TRI  # noqa: E402
from ctxcache.kernels.reference import (  # noqa: E402
    add_rms_norm_ref, assemble_kv_ref, grouped_attention_ref, kv_deviation_at_ref,
    kv_deviation_ref, rope_qkv_ref, rope_shift_ref, scatter_kv_ref, selective_attention_ref,
    silu_mul_ref, topk_ref,
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


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen2"])
def test_every_strategy_on_triton_kernels_matches_torch_kernels(model):
    """The whole reuse path (assembly, selective loop, APE, prefix) on the Triton ops equals
    the plain-torch ops, and 100 % recompute equals full prefill."""
    from ctxcache.engine import Engine
    from ctxcache.fusion import (
        APE, CacheBlend, CacheCraft, FullPrefill, FusionContext, NaiveReuse, PrefixReuse, Segment,
    )
    from ctxcache.kv import KVStore, MemoryTier

    outs = {}
    for backend in ("torch", "triton"):
        eng = Engine.load(f"random:{model}", kernels=backend)
        ctx = FusionContext(eng, KVStore([MemoryTier(1 << 26)]), reserve_tokens=4)
        g = torch.Generator().manual_seed(3)
        ids = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (6, 11, 9, 7, 5)]
        segs = [Segment.prefix(ids[0]), Segment.chunk(ids[1]), Segment.chunk(ids[2]),
                Segment.chunk(ids[3]), Segment.text(ids[4])]
        cc = CacheCraft(0.3, probe_uses=1)
        outs[backend] = [s.build(ctx, segs) for s in (
            CacheBlend(0.3), CacheBlend(1.0), FullPrefill(), NaiveReuse(), APE(0.7, 0.8),
            PrefixReuse(), PrefixReuse(), cc, cc)]
        assert outs[backend][-1].stats.extra["preselected"]
    for a, b in zip(outs["torch"], outs["triton"]):
        assert (a.logits - b.logits).abs().max().item() <= 1e-4, a.stats.strategy
        assert (a.kv.k - b.kv.k).abs().max().item() <= 1e-4, a.stats.strategy
        assert (a.kv.v - b.kv.v).abs().max().item() <= 1e-4, a.stats.strategy
    full = outs["triton"][2]
    for r in (outs["triton"][1], outs["triton"][6]):  # 100 % recompute; warm prefix hit
        assert (r.logits - full.logits).abs().max().item() <= 1e-4
    assert outs["triton"][6].stats.reused_tokens > 0


def inv_freq_for(d):
    return 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_assemble_kv_places_every_source_in_one_launch(dtype):
    L, H, D = 3, 2, 16
    srcs = [(rnd(L, H, n, D, dtype=dtype), rnd(L, H, n, D, dtype=dtype)) for n in (5, 7, 3)]
    n = 21
    slot_src = torch.tensor([0] * 5 + [-1, -1] + [1] * 7 + [2] * 3 + [-1] * 2 + [1, 1])
    slot_tok = torch.tensor(list(range(5)) + [0, 0] + list(range(7)) + list(range(3))
                            + [0, 0] + [2, 3])
    delta = torch.tensor([0] * 5 + [0, 0] + [7] * 7 + [14] * 3 + [0, 0] + [-3, 900])
    K = torch.full((L, H, n + 4, D), float("nan"), dtype=dtype)
    V = K.clone()
    Kr, Vr = K.clone(), V.clone()
    ok, ov, ln = TRI.source_offsets(K, V, srcs)
    tables = torch.tensor(ok + ov + ln + slot_src.tolist() + slot_tok.tolist() + delta.tolist())
    TRI.assemble_kv(K, V, tables, n, inv_freq_for(D), True)
    assemble_kv_ref(Kr, Vr, srcs, slot_src, slot_tok, delta, inv_freq_for(D))
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert (K[:, :, :n].float() - Kr[:, :, :n].float()).abs().max().item() <= tol
    assert torch.equal(V[:, :, :n], Vr[:, :, :n])
    assert torch.isnan(K[:, :, n:]).all(), "slots past n are untouched (room for decode)"
    assert not K[:, :, 5:7].any() and not V[:, :, 5:7].any(), "slots without a source are zero"
    K2, V2 = torch.zeros_like(K), torch.zeros_like(V)
    ok, ov, ln = TRI.source_offsets(K2, V2, srcs)
    tables = torch.tensor(ok + ov + ln + slot_src.tolist() + slot_tok.tolist() + delta.tolist())
    for layer in range(L):  # layer by layer (loading overlapped with compute) gives the same
        TRI.assemble_kv(K2, V2, tables, n, inv_freq_for(D), True, layers=(layer, 1))
    assert torch.equal(K2[:, :, :n], K[:, :, :n])


@pytest.mark.parametrize("t", [1, 9, 40])
@pytest.mark.parametrize("scaling", [1.0, 1.3])
def test_rope_qkv_with_and_without_scatter(t, scaling):
    hq, hkv, d = 4, 2, 16
    qkv = rnd(t, (hq + 2 * hkv) * d)
    pos = torch.randint(0, 3000, (t,), generator=G).to(torch.int32)
    ref = rope_qkv_ref(qkv, pos, inv_freq_for(d), hq, hkv, scaling)
    plain = qkv.clone()
    OPS.rope_qkv(plain, pos, inv_freq_for(d), hq, hkv, scaling)
    assert (plain - ref).abs().max().item() <= 1e-5
    out = qkv.clone()
    K, V = torch.zeros(hkv, 64, d), torch.zeros(hkv, 64, d)
    slots = torch.randperm(64, generator=G)[:t].to(torch.int32)
    OPS.rope_qkv(out, pos, inv_freq_for(d), hq, hkv, scaling, K, V, slots)
    x = ref.view(t, -1, d)
    assert (out - ref).abs().max().item() <= 1e-5
    assert (K[:, slots.long()] - x[:, hq:hq + hkv].transpose(0, 1)).abs().max().item() <= 1e-5
    assert torch.equal(V[:, slots.long()], x[:, hq + hkv:].transpose(0, 1))
    untouched = torch.ones(64, dtype=torch.bool)
    untouched[slots.long()] = False
    assert not K[:, untouched].any()


@pytest.mark.parametrize("rows,cols", [(1, 16), (5, 48), (3, 130)])
def test_add_rms_norm_silu_mul_and_deviation_at(rows, cols):
    h, r, w = rnd(rows, cols), rnd(rows, cols), rnd(cols)
    a, b = h.clone(), h.clone()
    assert (OPS.add_rms_norm(a, r, w, 1e-6) - add_rms_norm_ref(b, r, w, 1e-6)).abs().max() <= 1e-5
    assert torch.allclose(a, b), "the residual sum is written back in place"
    assert (OPS.add_rms_norm(h.clone(), None, w, 1e-6)
            - add_rms_norm_ref(h.clone(), None, w, 1e-6)).abs().max() <= 1e-5
    gu = rnd(rows, 2 * cols)
    assert (OPS.silu_mul(gu) - silu_mul_ref(gu)).abs().max().item() <= 1e-6
    kn, vn = rnd(2, rows, 16), rnd(2, rows, 16)
    K, V = rnd(2, 40, 16), rnd(2, 40, 16)
    slots = torch.randperm(40, generator=G)[:rows].to(torch.int32)
    assert torch.allclose(OPS.kv_deviation_at(kn, vn, K, V, slots),
                          kv_deviation_at_ref(kn, vn, K, V, slots.long()), rtol=1e-5)


def test_grouped_attention_is_plain_attention_without_adjustment():
    """APE's combination with T = 1 and S = 1 is ordinary attention over the same keys; a
    temperature sharpens only the context part, and S scales the context's share."""
    hq, hkv, d = 4, 2, 16
    kp = torch.cat([torch.arange(5), torch.arange(5, 12), torch.arange(5, 10), torch.arange(12, 15)])
    qp = torch.arange(12, 15)
    q, k, v = rnd(hq, 3, d), rnd(hkv, kp.numel(), d), rnd(hkv, kp.numel(), d)
    plain = selective_attention_ref(q, k, v, qp, kp, 0.25)
    assert (grouped_attention_ref(q, k, v, qp, kp, 0.25, 5, 17, 1.0, 0.0) - plain).abs().max() < 1e-5
    # S → 0: the contexts get no weight, as if they were masked out
    keep = torch.ones(kp.numel(), dtype=torch.bool)
    keep[5:17] = False
    no_ctx = selective_attention_ref(q, k[:, keep], v[:, keep], qp, kp[keep], 0.25)
    assert (grouped_attention_ref(q, k, v, qp, kp, 0.25, 5, 17, 0.5, -60.0) - no_ctx).abs().max() < 1e-4


@pytest.mark.parametrize("hq,hkv", [(6, 2), (7, 1), (8, 2)])
def test_attention_plan_bounds_cover_every_visible_key(hq, hkv):
    """The per-tile key bounds (used on GPU to skip blocks and masks) never cut a visible key:
    hi covers every key some row sees, and every key below lo is seen by all rows."""
    from ctxcache.kernels.triton_ops import _tile_m, attention_plan

    tq, tk, d = 45, 300, 16
    qp = torch.sort(torch.randperm(tk, generator=G)[:tq]).values
    kp = torch.arange(tk)
    group = hq // hkv
    _, _, bounds = attention_plan(qp, kp, d, True, group)
    bm = _tile_m(d, "cpu", group)
    n_tiles = -(-tq * group // bm)
    assert bounds.numel() == 2 * n_tiles
    hi, lo = bounds[:n_tiles], bounds[n_tiles:]
    for j in range(n_tiles):
        queries = {r // group for r in range(j * bm, (j + 1) * bm) if r // group < tq}
        need = max(int((kp <= qp[i]).sum()) for i in queries)
        assert int(hi[j]) >= need
        assert all(bool((kp[: int(lo[j])] <= qp[i]).all()) for i in queries)


@pytest.mark.parametrize("hq,hkv,tq,tk,d", [(4, 2, 3, 200, 16), (6, 2, 5, 150, 16),
                                            (4, 1, 1, 90, 32), (8, 8, 2, 300, 16)])
def test_split_k_attention_plain_and_ape_groups(hq, hkv, tq, tk, d):
    """Split-K (keys split across programs, partials merged by log-sum-exp) equals the plain
    attention; with a context group it equals APE's two-term combination."""
    q, k, v = rnd(hq, tq, d), rnd(hkv, tk, d), rnd(hkv, tk, d)
    kp = torch.arange(tk)
    qp = torch.sort(torch.randint(tk // 2, tk, (tq,), generator=G)).values
    plan = TRI.split_plan(qp, kp, d, hq // hkv, d ** -0.5)
    assert plan[3][4] > 1, "the keys are split"
    out = TRI.split_attention(q, k, v, plan)
    assert (out - selective_attention_ref(q, k, v, qp, kp, d ** -0.5)).abs().max().item() <= 1e-5
    s, lens = 7, (40, 25, 33)  # APE: prefix, three contexts at the same positions, queries
    kp2 = torch.cat([torch.arange(s)] + [torch.arange(s, s + n) for n in lens]
                    + [torch.arange(s + 40, s + 40 + tq)])
    end = s + sum(lens)
    k2, v2 = rnd(hkv, kp2.numel(), d), rnd(hkv, kp2.numel(), d)
    qp2 = torch.arange(s + 40, s + 40 + tq)
    for temp, scale in ((1.0, 1.0), (0.6, 0.8)):
        plan = TRI.split_plan(qp2, kp2, d, hq // hkv, d ** -0.5, context=(s, end, temp))
        ls = float(torch.log(torch.tensor(scale)))
        out = TRI.split_attention(q, k2, v2, plan, log_scale=ls, temperature=temp)
        ref = grouped_attention_ref(q, k2, v2, qp2, kp2, d ** -0.5, s, end, temp, ls)
        assert (out - ref).abs().max().item() <= 1e-5
