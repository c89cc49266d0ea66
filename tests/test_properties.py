"""Property tests (hypothesis) for the library API: arbitrary token ids, positions, recompute
ratios, chunk lists, policies and store entries either work exactly or raise a typed ctxcache
error — never another exception, never silently wrong data."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctxcache.errors import CtxCacheError
from ctxcache.fusion import CacheBlend, FullPrefill, FusionContext, NaiveReuse, Segment
from ctxcache.kv import KVStore, MemoryTier
from ctxcache.semantic.policy import make_policy

SETTINGS = settings(max_examples=40, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))
VOCAB_EDGE = st.one_of(st.integers(-5, 300), st.integers(-(2**70), 2**70))


@pytest.fixture(scope="module")
def tiny(tiny_engines):
    return tiny_engines["tiny-llama"]


@SETTINGS
@given(ids=st.lists(VOCAB_EDGE, max_size=12),
       positions=st.one_of(st.none(), st.lists(st.integers(-3, 10**6), max_size=12)))
def test_prefill_takes_any_ids_or_raises_typed(tiny, ids, positions):
    vocab = tiny.spec.vocab_size
    try:
        out = tiny.prefill(ids, positions)
    except CtxCacheError:
        valid_ids = bool(ids) and all(0 <= i < vocab for i in ids)
        valid_pos = positions is None or (len(positions) == len(ids) and all(
            0 <= p < tiny.spec.max_positions for p in positions))
        assert not (valid_ids and valid_pos), "valid input refused"
        return
    assert ids and all(0 <= i < vocab for i in ids)
    assert out.kv.num_tokens == len(ids) and torch.isfinite(out.logits).all()


@SETTINGS
@given(ratio=st.floats(allow_nan=True, allow_infinity=True, width=32))
def test_recompute_ratio_in_unit_interval_or_typed_error(ratio):
    try:
        CacheBlend(ratio)
    except CtxCacheError:
        assert not 0.0 <= ratio <= 1.0
        return
    assert 0.0 <= ratio <= 1.0


@settings(max_examples=25, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_any_chunking_full_recompute_equals_full_prefill(tiny, data):
    """Split a random prompt into random chunks: CacheBlend at r=1 must reproduce full prefill,
    and naive reuse must at least produce K/V for every token at the right positions."""
    vocab = tiny.spec.vocab_size
    ids = data.draw(st.lists(st.integers(0, vocab - 1), min_size=3, max_size=40))
    cuts = sorted(data.draw(st.sets(st.integers(1, len(ids) - 1), max_size=5)))
    bounds = [0, *cuts, len(ids)]
    parts = [ids[a:b] for a, b in zip(bounds, bounds[1:])]
    segs = [Segment.prefix(parts[0])] + [Segment.chunk(p) for p in parts[1:-1]] + \
        ([Segment.text(parts[-1])] if len(parts) > 1 else [])
    ctx = FusionContext(tiny, KVStore([MemoryTier(64 << 20)]), "props")
    ref = FullPrefill().build(ctx, segs)
    blend = CacheBlend(1.0).build(ctx, segs)
    assert torch.allclose(blend.logits, ref.logits, atol=2e-4, rtol=1e-4)
    naive = NaiveReuse().build(ctx, segs)
    assert naive.kv.num_tokens == len(ids)
    assert naive.kv.positions.tolist() == list(range(len(ids)))


@SETTINGS
@given(values=st.dictionaries(
    st.sampled_from(["threshold", "ttl_s", "max_entries", "max_bytes", "cacheable", "bogus"]),
    st.one_of(st.floats(allow_nan=True), st.integers(-10, 10**12), st.booleans(), st.text(
        max_size=5), st.none()), max_size=4))
def test_policy_values_validated_or_typed_error(values):
    base = {"threshold": 0.9, "ttl_s": 60.0}
    try:
        pol = make_policy({**base, **values})
    except CtxCacheError:
        return
    assert 0.0 <= pol.threshold <= 1.0 and pol.ttl_s >= 0


@SETTINGS
@given(n=st.integers(1, 16), extra=st.integers(-3, 3),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_store_round_trips_or_refuses_mismatch(n, extra, dtype):
    from ctxcache.engine.kvcache import KVCache

    store = KVStore([MemoryTier(16 << 20)])
    k = torch.randn(2, 2, n, 8).to(dtype)
    kv = KVCache(k, -k, torch.arange(n))
    ids = list(range(max(0, n + extra)))
    try:
        key = store.put(kv, ids, model="m")
    except CtxCacheError:
        assert extra != 0
        return
    assert extra == 0
    got = store.get(key)
    assert torch.equal(got.kv.k, k) and torch.equal(got.kv.v, -k)
    assert got.token_ids.tolist() == ids
