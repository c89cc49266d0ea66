"""KV reuse strategies against full prefill on the real model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctxcache.engine import SamplingParams
from ctxcache.engine.generate import stream_from_kv
from ctxcache.errors import ChunkMismatchError, InvalidInputError, UnknownChunkError
from ctxcache.fusion import (
    APE, CacheBlend, CacheCraft, FullPrefill, FusionContext, NaiveReuse, Planner, PrefixReuse,
    Segment, default_strategies, first_token_kl, make_strategy,
)
from ctxcache.kv import KVStore, MemoryTier

TOL = 1e-3
SYSTEM = "<|im_start|>system\nAnswer using the passages.<|im_end|>\n<|im_start|>user\n"
DOCS = [
    "Passage: The Rhine flows through Switzerland, Germany and the Netherlands.\n",
    "Passage: Mount Everest is the highest mountain on Earth, at 8,849 metres.\n",
    "Passage: The Danube is the second-longest river in Europe; it ends in the Black Sea.\n",
]
QUESTION = "Question: Where does the Danube end?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture
def ctx(engine):
    return FusionContext(engine, KVStore([MemoryTier(1 << 30)]), "tenant-a")


def segs(engine, docs=DOCS, question=QUESTION):
    return ([Segment.prefix(engine.encode(SYSTEM))]
            + [Segment.chunk(engine.encode(d)) for d in docs]
            + [Segment.text(engine.encode(question))])


def close(a, b, tol=TOL):
    return (a - b).abs().max().item() <= tol


def test_full_equals_engine_prefill(ctx, engine):
    s = segs(engine)
    res = FullPrefill().build(ctx, s)
    ids = [t for seg in s for t in seg.token_ids]
    assert res.token_ids == ids
    assert close(res.logits, engine.prefill(ids).logits[-1])
    assert res.stats.compute_fraction == 1.0


def test_prefix_is_exact_cold_and_warm(ctx, engine):
    s = segs(engine)
    ref = FullPrefill().build(ctx, s)
    cold = PrefixReuse().build(ctx, s)
    warm = PrefixReuse().build(ctx, s)
    for r in (cold, warm):
        assert close(r.logits, ref.logits) and close(r.kv.k, ref.kv.k) and close(r.kv.v, ref.kv.v)
        assert first_token_kl(ref.logits, r.logits) < 1e-6
    assert cold.stats.reused_tokens == 0
    assert warm.stats.reused_tokens == len(ref.token_ids) - len(s[-1].token_ids)
    # documents in another order: only the shared system prompt is a prefix hit
    other = PrefixReuse().build(ctx, segs(engine, DOCS[::-1]))
    assert other.stats.reused_tokens == len(s[0].token_ids)


@pytest.mark.parametrize("strategy", [CacheBlend(1.0), CacheCraft(base_ratio=1.0, reuse_below=0.0)])
def test_full_recompute_equals_full_prefill(ctx, engine, strategy):
    s = segs(engine)
    ref = FullPrefill().build(ctx, s)
    for _ in range(2):  # cold (chunks built) and warm (chunks loaded)
        r = strategy.build(ctx, s)
        assert close(r.logits, ref.logits)
        assert close(r.kv.k, ref.kv.k) and close(r.kv.v, ref.kv.v)


def test_naive_and_ape_without_chunks_equal_full(ctx, engine):
    s = [Segment.text(engine.encode(SYSTEM + "".join(DOCS) + QUESTION))]
    ref = FullPrefill().build(ctx, s)
    assert close(NaiveReuse().build(ctx, s).logits, ref.logits)
    assert close(APE().build(ctx, s).logits, ref.logits)


def test_cacheblend_r0_equals_naive(ctx, engine):
    s = segs(engine)
    nv = NaiveReuse().build(ctx, s)
    cb = CacheBlend(0.0, sink_tokens=0).build(ctx, s)
    assert close(nv.logits, cb.logits) and close(nv.kv.k, cb.kv.k) and close(nv.kv.v, cb.kv.v)


def test_cacheblend_recompute_improves_over_naive(ctx, engine):
    s = segs(engine)
    ref = FullPrefill().build(ctx, s)
    kl_naive = first_token_kl(ref.logits, NaiveReuse().build(ctx, s).logits)
    kl_cb = first_token_kl(ref.logits, CacheBlend(0.5).build(ctx, s).logits)
    assert kl_cb < kl_naive


def test_positions_after_repositioning(ctx, engine):
    s = segs(engine)
    ref = FullPrefill().build(ctx, s)
    n = len(ref.token_ids)
    for strat in (NaiveReuse(), CacheBlend(0.15), CacheCraft()):
        r = strat.build(ctx, s)
        assert torch.equal(r.kv.positions.cpu(), torch.arange(n))
        # layer 0 K depends only on token + position: re-positioned chunks must match exactly
        assert close(r.kv.k[0], ref.kv.k[0], 1e-4)
        assert r.stats.reused_tokens > 0 and r.stats.compute_fraction < 1.0


def test_ape_layout_and_decode(ctx, engine):
    s = segs(engine)
    r = APE(temperature=0.9, scale=0.9).build(ctx, s)
    n_prefix = len(s[0].token_ids)
    longest = max(len(x.token_ids) for x in s[1:-1])
    pos = r.kv.positions.cpu()
    # every chunk starts right after the shared prefix; the query follows the longest chunk
    start = n_prefix
    for x in s[1:-1]:
        assert pos[start].item() == n_prefix
        start += len(x.token_ids)
    assert pos[start].item() == n_prefix + longest
    g = r.context_group
    assert g is not None and (g.start, g.end) == (n_prefix, start)
    out = [c for c in stream_from_kv(engine, r.kv, r.logits, SamplingParams(max_tokens=8),
                                     context_group=g)]
    assert out and out[-1].finish_reason in ("stop", "length")


def test_chunks_are_cached_once_and_reused(ctx, engine):
    s = segs(engine)
    first = CacheBlend(0.15).build(ctx, s)
    again = CacheBlend(0.15).build(ctx, s)
    assert first.stats.chunk_misses >= len(DOCS)
    assert again.stats.chunk_misses == 0 and again.stats.chunk_hits >= len(DOCS)


def test_cachecraft_learns_budgets_and_keeps_variants(ctx, engine):
    cc = CacheCraft(base_ratio=0.15, variant_above=0.1)
    s = segs(engine)
    r1 = cc.build(ctx, s)
    assert len(cc.table) == len(DOCS)
    r2 = cc.build(ctx, s)
    assert r2.stats.extra["variants_used"] >= 1, "repaired chunks are kept per context"
    assert r1.stats.extra["chunk_budgets"] != r2.stats.extra["chunk_budgets"]
    budgets = cc.budgets([p for p in cc.table])
    assert all(0.0 <= b <= 1.0 for b in budgets)
    # once every chunk has stored token scores, selection happens before any layer runs
    assert r2.stats.extra["preselected"]
    fresh = CacheCraft(base_ratio=0.15)
    first = fresh.build(ctx, segs(engine, DOCS[::-1]))
    second = fresh.build(ctx, segs(engine, DOCS[::-1]))
    assert not first.stats.extra["preselected"] and second.stats.extra["preselected"]
    assert second.stats.flops < first.stats.flops


def test_bad_segment_lists(ctx, engine, tiny_engines):
    with pytest.raises(InvalidInputError, match="empty"):
        CacheBlend().build(ctx, [])
    with pytest.raises(InvalidInputError):
        Segment("sidebar", [1, 2])
    with pytest.raises(InvalidInputError):
        Segment.chunk([])
    with pytest.raises(InvalidInputError, match="prefix"):
        NaiveReuse().build(ctx, [Segment.chunk([5, 6]), Segment.prefix([7]), Segment.text([8])])
    with pytest.raises(UnknownChunkError):
        CacheBlend().build(ctx, [Segment.chunk(key="0" * 32), Segment.text([5])])
    with pytest.raises(InvalidInputError, match="out of range"):
        NaiveReuse().build(ctx, [Segment.chunk([engine.spec.vocab_size]), Segment.text([5])])
    # a chunk computed by another model
    tiny = tiny_engines["tiny-llama"]
    kv = tiny.prefill([1, 2, 3]).kv
    foreign = ctx.store.put(kv, [1, 2, 3], model=tiny.fingerprint, namespace="tenant-a")
    with pytest.raises(ChunkMismatchError, match="computed by model"):
        CacheBlend().build(ctx, [Segment.chunk(key=foreign), Segment.text([5])])
    # a chunk of another tenant is invisible
    ids = engine.encode(DOCS[0])
    key = ctx.store.put(engine.prefill(ids).kv, ids, model=engine.fingerprint,
                        namespace="tenant-a")
    CacheBlend().build(ctx, [Segment.chunk(key=key), Segment.text([5])])  # visible to its owner
    other = FusionContext(engine, ctx.store, "tenant-b")
    with pytest.raises(UnknownChunkError):
        CacheBlend().build(other, [Segment.chunk(key=key), Segment.text([5])])
    with pytest.raises(InvalidInputError):
        make_strategy("cacheblend", recompute_ratio=2.0)
    with pytest.raises(InvalidInputError):
        make_strategy("teleport")


def test_key_only_chunk_segments(ctx, engine):
    ids = engine.encode(DOCS[1])
    key = ctx.store.put(engine.prefill(ids).kv, ids, model=engine.fingerprint,
                        namespace="tenant-a")
    by_key = NaiveReuse().build(ctx, [Segment.chunk(key=key), Segment.text(engine.encode(QUESTION))])
    by_ids = NaiveReuse().build(ctx, [Segment.chunk(ids), Segment.text(engine.encode(QUESTION))])
    assert close(by_key.logits, by_ids.logits)


def test_last_token_is_always_computed(ctx, engine):
    s = [Segment.prefix(engine.encode(SYSTEM)), Segment.chunk(engine.encode(DOCS[0]))]
    ref = FullPrefill().build(ctx, s)
    r = NaiveReuse().build(ctx, s)
    assert r.stats.recomputed_tokens == 1
    assert r.logits.shape == ref.logits.shape


def test_planner_auto_falls_back_to_full_until_proven(ctx, engine):
    planner = Planner(default_strategies(), default="auto", min_samples=2, sample_rate=1.0,
                      min_top1=1.0, seed=0)
    s = segs(engine)
    served = [planner.run(ctx, s).stats.extra["planner"]["served"] for _ in range(6)]
    assert served[0] == "full"
    report = planner.report()
    assert sum(v["n"] for v in report.values()) >= 1, "unproven strategies are shadow-checked"
    assert served[-1] != "full" or all(v["n"] < 2 or v["top1"] < 1.0 for v in report.values())
    with pytest.raises(InvalidInputError):
        planner.run(ctx, s, requested="nope")
    fixed = Planner(default_strategies(), default="prefix", sample_rate=0.0)
    assert fixed.run(ctx, s).stats.extra["planner"]["served"] == "prefix"
    with pytest.raises(InvalidInputError):
        Planner(default_strategies(), default="zzz")


def test_flops_accounting(ctx, engine):
    s = segs(engine)
    rs = {n: make_strategy(n).build(ctx, s) for n in ("full", "naive")}
    rs["cb15"] = CacheBlend(0.15).build(ctx, s)
    rs["cb50"] = CacheBlend(0.5).build(ctx, s)
    f = {k: v.stats.compute_fraction for k, v in rs.items()}
    assert f["full"] == 1.0
    assert f["naive"] < f["cb15"] < f["cb50"] < 1.0


def test_cost_model_calibrates_and_guards_reuse(tiny_engines):
    """Calibration times full prefill and each strategy on this engine; the planner then serves
    full prefill wherever reuse is predicted slower, and the fastest proven strategy otherwise."""
    from ctxcache.fusion.costmodel import CostModel, calibrate, lengths_for

    eng = tiny_engines["tiny-llama"]
    strategies = default_strategies()
    cm = calibrate(eng, strategies, repeat=1)
    assert set(cm.coeffs) >= {"full", "naive", "cacheblend"}
    assert len(cm.measured) == len(lengths_for(eng)) * len(cm.coeffs)
    assert all(r["s"] > 0 for r in cm.measured)
    assert CostModel.from_json(cm.to_json()).coeffs == cm.coeffs
    # a model where reuse always costs more than full prefill: every choice becomes full
    slow = CostModel({"full": [0.001, 1e-6, 0.0], "naive": [1.0, 0.0, 0.0],
                      "cacheblend": [1.0, 0.0, 0.0]})
    planner = Planner(strategies, default="cacheblend", sample_rate=0.0, cost_model=slow)
    ctx = FusionContext(eng, KVStore([MemoryTier(1 << 26)]))
    s = [Segment.prefix([1, 2, 3]), Segment.chunk(list(range(5, 40))), Segment.text([7, 8])]
    assert planner.run(ctx, s).stats.extra["planner"]["served"] == "full"
    assert planner.run(ctx, s, requested="cacheblend").stats.strategy == "cacheblend"
    fast = CostModel({"full": [0.5, 0.005, 0.0], "naive": [0.01, 0.0, 0.0],
                      "cacheblend": [0.1, 0.0, 0.0]})
    auto = Planner(strategies, default="auto", min_samples=1, min_top1=0.0, sample_rate=0.0,
                   cost_model=fast)
    auto.tracker.record("naive", 0.1, True)
    auto.tracker.record("cacheblend", 0.01, True)
    assert auto.run(ctx, s).stats.extra["planner"]["served"] == "naive"
    assert auto.describe()["served"] == {"naive": 1}
    # Cache-Craft's first uses (attention probes) are priced by their own calibration
    assert "cachecraft:cold" in cm.coeffs
    craft = CostModel({"full": [0.5, 0.0, 0.0], "cachecraft": [0.1, 0.0, 0.0],
                       "cachecraft:cold": [0.9, 0.0, 0.0]})
    guarded = Planner(strategies, default="cachecraft", sample_rate=0.0, cost_model=craft)
    served = [guarded.run(ctx, s).stats.extra["planner"]["served"] for _ in range(5)]
    probes = strategies["cachecraft"].probe_uses
    assert served[0] == "full", "a first use slower than full prefill is not served"
    guarded.run(ctx, s, requested="cachecraft")  # explicit requests warm it up
    for _ in range(probes):
        guarded.run(ctx, s, requested="cachecraft")
    assert guarded.run(ctx, s).stats.extra["planner"]["served"] == "cachecraft"
    # missing chunks are built on the way: a cold prompt counts their prefill
    assert fast.predict("naive", 100, missing=50) == fast.predict("naive", 100) + 0.25


def test_cacheblend_sink_tokens_and_per_chunk_budgets(ctx, engine):
    """The long-context variants: each chunk's first tokens recomputed, the recompute budget
    spread per chunk. With everything recomputed both equal full prefill; at a partial ratio
    every chunk head is among the recomputed rows and every chunk gets its share."""
    from ctxcache.fusion.chunks import cached_mask, lookup, resolve

    s = segs(engine)
    ref = FullPrefill().build(ctx, s)
    for kw in ({"sink_tokens": 2}, {"per_chunk": True}, {"sink_tokens": 3, "per_chunk": True}):
        r = CacheBlend(1.0, **kw).build(ctx, s)
        assert close(r.logits, ref.logits, 2e-3), kw
    cb = CacheBlend(0.2, sink_tokens=2, per_chunk=True)
    pieces = resolve(ctx, s)
    _, sources = lookup(ctx, pieces, cb.start(ctx, s)[0])
    cached = cached_mask(len(ref.token_ids), sources)
    plan = cb.plan(pieces, cached, engine.spec.num_layers)
    chunks = [p for p in pieces if p.role == "chunk"]
    for p in chunks:  # chunk heads are must rows
        at = np.searchsorted(plan.rows, [p.start, p.start + 1])
        assert plan.must[at].all()
    last = plan.selections[-1]
    assert len(last.group_keep) == len(chunks)
    for p, k in zip(chunks, last.group_keep):
        assert k >= 2 + int(np.ceil(0.2 * (len(p.token_ids) - 2) - 1e-9))
    assert last.keep == int(plan.must.sum()) + sum(k - 2 for k in last.group_keep)
    with pytest.raises(InvalidInputError):
        CacheBlend(0.15, sink_tokens=-1)


def test_cacheblend_question_focus(ctx, engine):
    """The two-pass focused build: at T = 1 it is plain CacheBlend (and full prefill at r = 1);
    at T < 1 the question attends over the chunk span with APE's adjustment, kept for decode;
    below ``focus_from`` tokens it is off."""
    s = segs(engine)
    ref = FullPrefill().build(ctx, s)
    assert close(CacheBlend(1.0, focus_from=0).build(ctx, s).logits, ref.logits, 2e-3)
    plain = CacheBlend(0.3).build(ctx, s)
    same = CacheBlend(0.3, focus_from=0).build(ctx, s)
    assert close(same.logits, plain.logits, 2e-3)
    assert close(same.kv.k, plain.kv.k, 2e-3) and close(same.kv.v, plain.kv.v, 2e-3)
    assert same.stats.recomputed_tokens >= plain.stats.recomputed_tokens
    focused = CacheBlend(0.3, query_temperature=0.5, focus_from=0).build(ctx, s)
    g = focused.context_group
    assert g is not None and g.temperature == 0.5
    assert g.start == len(s[0].token_ids)
    assert g.end == len(ref.token_ids) - len(s[-1].token_ids)
    assert not close(focused.logits, plain.logits, 1e-4)  # the adjustment is real
    # the chunks' K/V is the same as plain CacheBlend's; only the question's rows differ
    assert close(focused.kv.k[:, :, :g.end], plain.kv.k[:, :, :g.end], 2e-3)
    text = engine.decode_ids([c.token_id for c in stream_from_kv(
        engine, focused.kv, focused.logits, SamplingParams(max_tokens=8),
        context_group=g, storage=focused.storage) if c.token_id is not None])
    assert text.strip()
    off = CacheBlend(0.3, query_temperature=0.5, focus_from=10 ** 6).build(ctx, s)
    assert off.context_group is None and close(off.logits, plain.logits, 2e-3)
    for bad in ({"query_temperature": 0.0}, {"query_temperature": 1.5}, {"focus_from": -1}):
        with pytest.raises(InvalidInputError):
            CacheBlend(0.15, **bad)


def test_answer_judge_and_confidence_bound():
    from ctxcache.fusion.judge import bucket_of, token_f1, wilson_lower

    assert token_f1([1, 2, 3], [1, 2, 3]) == 1.0
    assert token_f1([1, 2], [3, 4]) == 0.0
    assert abs(token_f1([1, 2, 3, 4], [1, 2]) - 2 / 3) < 1e-9
    assert token_f1([], []) == 1.0
    # ten agreements out of ten is not proof at 0.9, thirty is
    assert wilson_lower(10, 10) < 0.9 < wilson_lower(30, 30)
    assert wilson_lower(0, 0) == 0.0 and wilson_lower(5, 10) < 0.5
    assert bucket_of(100) == "<=4096" and bucket_of(9000) == "<=16384"
    assert bucket_of(40000) == ">32768"


def test_planner_proves_strategies_by_answer_agreement(ctx, engine):
    """``auto`` with an AnswerJudge: while unproven it serves full prefill and judges every
    candidate's greedy answer against full prefill's on the same request; a strategy whose
    answers agree is then served in that length bucket, one that disagrees is not."""
    from ctxcache.fusion.judge import AnswerJudge

    planner = Planner(default_strategies(), default="auto", min_samples=3, sample_rate=0.0,
                      min_agreement=0.4, judge=AnswerJudge(engine, tokens=6), seed=0)
    s = segs(engine)
    served = [planner.run(ctx, s).stats.extra["planner"]["served"] for _ in range(4)]
    assert served[:3] == ["full"] * 3
    report = planner.answer_report()
    assert report, "candidates were judged"
    assert all(v["n"] <= 3 for v in report.values())
    proven = [k.split()[0] for k, v in report.items() if v["n"] >= 3
              and v["agreement_lower_bound"] >= 0.4]
    # exact prefix reuse gives full prefill's answer: it must be among the proven
    assert "prefix" in proven
    assert served[3] in proven
    assert planner.describe()["served_by_bucket"][f"{served[3]} <=4096"] == 1
    # a different length bucket is not proven by these samples
    long = segs(engine, docs=DOCS * 120)
    assert planner.choose(None, Planner.sizes(ctx, long))[0] == "full"


def test_auto_keeps_judging_until_the_bound_decides(ctx, engine):
    """A strategy past ``min_samples`` whose bound has not decided (9 of 10 agree: neither
    proven at 0.85 nor disproven) is still judged; 10 of 10 proves it; one that fills the
    tracker's window undecided stops costing checks."""
    from ctxcache.fusion.judge import AnswerJudge

    planner = Planner(default_strategies(), default="auto", min_samples=10, sample_rate=0.0,
                      min_agreement=0.85, judge=AnswerJudge(engine, tokens=4), seed=0)
    s = segs(engine)
    sizes = Planner.sizes(ctx, s)
    bucket = "<=4096"
    for f1 in [1.0] * 9 + [0.0]:
        planner.tracker.record_answer("cacheblend", bucket, f1)
    assert "cacheblend" in planner._proving(bucket, sizes)
    assert planner.choose(None, sizes)[0] == "full"
    served = planner.run(ctx, s)  # the check runs inline (no defer): one more sample
    assert served.stats.extra["planner"]["served"] == "full"
    assert planner.tracker.answer_summary("cacheblend", bucket, 0.5)["n"] == 11
    for f1 in [1.0] * 10:
        planner.tracker.record_answer("prefix", bucket, f1)
    assert "prefix" not in planner._proving(bucket, sizes)  # proven: served, not judged
    assert planner.choose(None, sizes)[0] == "prefix"
    cap = 4 * planner.tracker.window
    for i in range(cap):
        planner.tracker.record_answer("naive", bucket, 1.0 if i % 7 else 0.0)
    a = planner.tracker.answer_summary("naive", bucket, 0.5)
    assert a["n"] == cap and a["agreement_lower_bound"] < 0.85
    assert "naive" not in planner._proving(bucket, sizes)


def test_deferred_check_runs_in_steps(ctx, engine):
    """A deferred answer check runs one step per ``run_deferred`` call (the reference build,
    its answer, then a build and an answer per judged strategy), so the serving engine can
    take a new request between steps; its result is recorded once, at the last step."""
    from ctxcache.fusion.judge import AnswerJudge

    planner = Planner(default_strategies(), default="cacheblend", sample_rate=1.0,
                      judge=AnswerJudge(engine, tokens=4), defer_checks=True, seed=0)
    s = segs(engine)
    assert planner.run(ctx, s).stats.extra["planner"]["shadow"] == "cacheblend"
    assert len(planner.deferred) == 1 and not planner.answer_report()
    recorded_at = []
    steps = 0
    while planner.run_deferred():
        steps += 1
        recorded_at.append(bool(planner.answer_report()))
    assert steps == 4  # reference build, its answer, the strategy's build, its answer
    assert recorded_at == [False, False, False, True]
    assert not planner.deferred and planner._check is None
    assert sum(v["n"] for v in planner.answer_report().values()) == 1


def test_default_routes_long_prompts_and_ape_sharpens_there(ctx, engine):
    """The default strategy's long-context route (``long_context``), APE's long-context
    temperature, and the cost guard refusing a strategy it has no timing for."""
    from ctxcache.fusion.costmodel import CostModel

    s = segs(engine)
    n = Planner.sizes(ctx, s)[0]
    planner = Planner(default_strategies(), default="cacheblend", sample_rate=0.0,
                      long_context=(n, "ape"))
    assert planner.run(ctx, s).stats.extra["planner"]["served"] == "ape"
    # an explicit strategy, or the default's own recompute ratio, is honoured as asked
    assert planner.run(ctx, s, requested="cacheblend").stats.strategy == "cacheblend"
    assert planner.run(ctx, s, recompute_ratio=0.3).stats.strategy == "cacheblend"
    short = Planner(default_strategies(), default="cacheblend", sample_rate=0.0,
                    long_context=(n + 1, "ape"))
    assert short.run(ctx, s).stats.extra["planner"]["served"] == "cacheblend"
    for bad in ((n, "zzz"), (-1, "ape")):
        with pytest.raises(InvalidInputError):
            Planner(default_strategies(), long_context=bad)
    ape = APE(0.9, 0.9, long_temperature=0.5, long_from=n)
    assert ape.temperature_for(n - 1) == 0.9 and ape.temperature_for(n) == 0.5
    sharp = ape.build(ctx, s)
    assert sharp.context_group.temperature == 0.5 and sharp.stats.extra["temperature"] == 0.5
    fixed = APE(0.9, 0.9, long_temperature=None).build(ctx, s)
    assert fixed.context_group.temperature == 0.9
    assert not close(sharp.logits, fixed.logits, 1e-4)
    with pytest.raises(InvalidInputError):
        APE(long_temperature=0.0)
    # no timing for a strategy: not known to be cheaper, so never picked by the guard
    cm = CostModel({"full": [0.5, 0.0, 0.0], "cacheblend": [0.1, 0.0, 0.0]})
    assert cm.cheaper_than_full("cacheblend", 100) and not cm.cheaper_than_full("kvcomm", 100)
    assert CostModel({}).cheaper_than_full("kvcomm", 100)  # no model: nothing to guard
