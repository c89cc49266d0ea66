"""CUDA graphs of the reuse loop under the serving engine's deferred capture (GPU only).

On a GPU machine: ``python -m pytest -q tests/test_graphs_cuda.py``. Skipped without CUDA."""

from __future__ import annotations

import random

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_deferred_capture_replays_exactly_and_queues_the_next_shapes():
    from ctxcache.engine import Engine
    from ctxcache.fusion.full import FullPrefill
    from ctxcache.fusion.graphs import loop_graphs
    from ctxcache.fusion.prefix import PrefixReuse
    from ctxcache.fusion.types import FusionContext, Segment
    from ctxcache.kv import KVStore, MemoryTier

    eng = Engine.load("random:qwen2.5-0.5b", device="cuda", dtype=torch.bfloat16)
    g = loop_graphs(eng)
    assert g is not None
    g.defer = True
    rng = random.Random(0)
    segs = [Segment.chunk([rng.randrange(1000, 30000) for _ in range(n)])
            for n in (300, 200, 250)]
    ask = Segment.text([rng.randrange(1000, 30000) for _ in range(12)])  # the turn's own text

    def fresh_ctx():
        return FusionContext(eng, KVStore([MemoryTier(1 << 30, "cpu")]), "graphs")

    ref = FullPrefill().build(fresh_ctx(), segs + [ask])
    pre = PrefixReuse()
    # an agent step: the first two segments cached, the third and the text new (262 rows)
    ctx = fresh_ctx()
    pre.build(ctx, segs[:2] + [ask])
    eager = pre.build(ctx, segs + [ask])  # a new shape: the engine's prefill, and queued
    assert not eager.stats.extra["cuda_graph"] and g.pending
    captures = 0
    while g.capture_pending():
        captures += 1
    assert captures > 1  # its own shape and the speculative next ones
    ctx = fresh_ctx()
    pre.build(ctx, segs[:2] + [ask])
    replay = pre.build(ctx, segs + [ask])  # the same shape again: replayed
    assert replay.stats.extra["cuda_graph"]
    for r in (eager, replay):
        assert r.stats.reused_tokens == 500
        assert int(r.logits.argmax()) == int(ref.logits.argmax())
        # bf16: K/V and logits of a different kernel path agree to bf16 rounding
        assert (r.kv.k.float() - ref.kv.k.float()).abs().max().item() < 0.1
        assert (r.logits.float() - ref.logits.float()).abs().max().item() < 0.15
    # the next step (a longer prompt, a new segment of a similar size) lands in a bucket that
    # was captured speculatively: replayed at first sight
    longer = segs + [Segment.chunk([rng.randrange(1000, 30000) for _ in range(200)]), ask]
    grown = pre.build(ctx, longer)
    assert grown.stats.reused_tokens == 750 and grown.stats.extra["cuda_graph"]
