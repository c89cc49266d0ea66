"""The serving engine: paged K/V pool, paged decode attention, continuous batching.

Every batched path is pinned to batch 1: on CPU fp32 the greedy tokens of requests decoded
together must be identical to each request decoded alone by the contiguous loop
(``stream_from_kv``), for full prefill and for reuse strategies (CacheBlend, APE).
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from ctxcache.engine import SamplingParams
from ctxcache.engine.generate import stream_from_kv
from ctxcache.engine.kv_pool import OutOfBlocks, PagedKVPool, block_hashes
from ctxcache.engine.scheduler import EngineRequest, ServingEngine
from ctxcache.errors import InvalidInputError
from ctxcache.fusion import FusionContext, Planner, Segment, default_strategies
from ctxcache.fusion.prompts import rag_segments
from ctxcache.kv import KVStore, MemoryTier

PASSAGES = [
    "The Nile is the longest river in Africa and flows north into the Mediterranean Sea.",
    "Mount Kilimanjaro in Tanzania is the highest mountain in Africa, at 5,895 metres.",
    "Lake Tanganyika is the deepest lake in Africa and the second deepest in the world.",
    "The Sahara is the largest hot desert on Earth, covering much of North Africa.",
]
QUESTIONS = ["Which lake is the deepest in Africa?", "How high is Kilimanjaro?",
             "Where does the Nile flow?", "What is the Sahara?", "Name a river in Africa.",
             "Which mountain is highest?"]


# ---------------------------------------------------------------------------- kernels
def _paged_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    hkv, hq, d, bs, nb = 2, 6, 16, 4, 24
    K = torch.randn(hkv, nb * bs, d, generator=g)
    V = torch.randn(hkv, nb * bs, d, generator=g)
    lens = torch.tensor([5, 0, 13, 1], dtype=torch.int32)
    perm = (torch.randperm(nb - 1, generator=g) + 1).int()
    tables = torch.zeros(4, 5, dtype=torch.int32)
    tables[0, :2], tables[2, :4], tables[3, :1] = perm[:2], perm[2:6], perm[6:7]
    q = torch.randn(4, hq, d, generator=g)
    groups = (torch.tensor([1, 0, 3, 0], dtype=torch.int32),
              torch.tensor([4, 0, 9, 0], dtype=torch.int32),
              torch.tensor([0.9, 1.0, 0.5, 1.0]), torch.tensor([-0.1, 0.0, -0.3, 0.0]))
    return q, K, V, tables, lens, bs, groups


@pytest.mark.parametrize("n_split", [1, 3])
def test_paged_decode_kernel_matches_reference(n_split):
    pytest.importorskip("triton")
    from ctxcache.kernels.reference import paged_decode_attention_ref
    from ctxcache.kernels.triton_paged import paged_decode_attention

    q, K, V, tables, lens, bs, groups = _paged_case()
    ref = paged_decode_attention_ref(q, K, V, tables, lens, bs, 0.25)
    out = paged_decode_attention(q, K, V, tables, lens, bs, 0.25, n_split=n_split)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(out[1]) == 0  # an empty sequence attends to nothing
    ref_g = paged_decode_attention_ref(q, K, V, tables, lens, bs, 0.25, groups)
    out_g = paged_decode_attention(q, K, V, tables, lens, bs, 0.25, n_split=n_split,
                                   groups=groups)
    assert torch.allclose(out_g, ref_g, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ref_g[2], ref[2], atol=1e-3)  # the APE groups changed something


def test_torch_paged_decode_matches_reference():
    from ctxcache.kernels import TORCH_OPS
    from ctxcache.kernels.reference import paged_decode_attention_ref

    q, K, V, tables, lens, bs, _ = _paged_case(1)
    ref = paged_decode_attention_ref(q, K, V, tables, lens, bs, 0.3)
    assert torch.allclose(TORCH_OPS.paged_decode(q, K, V, tables, lens, bs, 0.3), ref,
                          atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- pool
def test_pool_allocation_sharing_and_eviction():
    pool = PagedKVPool(2, 1, 4, num_blocks=5, block_size=2)
    assert pool.num_free == 4  # block 0 is scratch
    a = pool.allocate(2)
    hs = block_hashes([1, 2, 3, 4], 2, 2)
    pool.write(a, 0, torch.ones(2, 1, 4, 4), torch.ones(2, 1, 4, 4))
    for b, h in zip(a, hs):
        pool.publish(b, h)
    assert pool.lookup_shared(hs) == a and pool.shared_hits == 2  # mapped, not copied
    pool.free(a)
    assert pool.stats().used == 2  # still referenced by the second user
    pool.free(a)
    assert pool.stats().cached == 2 and pool.num_free == 4  # kept for later prefix hits
    assert pool.lookup_shared(block_hashes([1, 2, 9, 9], 2, 2)) == a[:1]  # a prefix only
    pool.free(a[:1])
    with pytest.raises(OutOfBlocks):
        pool.allocate(5)
    got = pool.allocate(4)  # evicts the cached blocks, least recently used first
    assert sorted(got) == [1, 2, 3, 4] and pool.lookup_shared(hs) == []
    k, v = pool.gather(a, 3)
    assert k.shape == (2, 1, 3, 4)


# ---------------------------------------------------------------------------- engine
@pytest.fixture(scope="module")
def setup(engine):
    store = KVStore([MemoryTier(1 << 30)])
    ctx = FusionContext(engine, store, "serving-tests")
    planner = Planner(default_strategies(), default="cacheblend", sample_rate=0.0)
    return engine, ctx, planner


def _alone(engine, res, params):
    return [c.token_id for c in stream_from_kv(engine, res.kv, res.logits, params,
                                               context_group=res.context_group)
            if c.token_id is not None]


def _submit(se, planner, ctx, segs, strategy, params):
    n = sum(len(s.token_ids) for s in segs)
    return se.submit(EngineRequest(lambda: planner.run(ctx, segs, strategy), params, n,
                                   len(segs[0].token_ids) if segs[0].role == "prefix" else 0))


def _rag(engine, q, passages=PASSAGES):
    return rag_segments(engine, "Answer briefly from the passages.", passages, q)


@pytest.mark.parametrize("strategy", ["full", "cacheblend", "ape"])
def test_batched_greedy_equals_batch_1(setup, strategy):
    engine, ctx, planner = setup
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    prompts = [_rag(engine, q, PASSAGES[i % 4:] + PASSAGES[:i % 4])
               for i, q in enumerate(QUESTIONS)]
    for segs in prompts:  # chunk caches warm, so both sides reuse the same K/V
        planner.run(ctx, segs, strategy)
    alone = [_alone(engine, planner.run(ctx, s, strategy), params) for s in prompts]
    se = ServingEngine(engine, max_running=8, kv_bytes=64 << 20).start()
    try:
        hs = [_submit(se, planner, ctx, s, strategy, params) for s in prompts]
        batched = [[c.token_id for c in h if c.token_id is not None] for h in hs]
        assert batched == alone
        assert se.stats["batch_size_sum"] / se.stats["steps"] > 2  # really batched
        assert all(h.info["strategy"] == strategy for h in hs)
    finally:
        se.close()
    assert se.pool.stats().used == 0  # every page returned


def test_per_request_parameters_inside_one_batch(setup):
    engine, ctx, planner = setup
    segs = [Segment.text(engine.chat_ids([{"role": "user", "content": q}])) for q in QUESTIONS]
    plist = [SamplingParams(max_tokens=3), SamplingParams(max_tokens=20, stop=["."]),
             SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=7),
             SamplingParams(max_tokens=10, temperature=1.2, top_k=20, seed=3),
             SamplingParams(max_tokens=16), SamplingParams(max_tokens=5, ignore_eos=True)]
    want = []
    for s, p in zip(segs, plist):
        res = planner.run(ctx, [s], "full")
        chunks = list(stream_from_kv(engine, res.kv, res.logits, p))
        want.append(("".join(c.text for c in chunks), chunks[-1].finish_reason))
    se = ServingEngine(engine, max_running=8, kv_bytes=64 << 20).start()
    try:
        hs = [_submit(se, planner, ctx, [s], "full", p) for s, p in zip(segs, plist)]
        got = []
        for h in hs:
            chunks = list(h)
            got.append(("".join(c.text for c in chunks), chunks[-1].finish_reason))
    finally:
        se.close()
    assert got == want
    assert got[0][1] == "length" and "." not in got[1][0]


def test_preemption_swaps_and_finishes_every_request(setup):
    engine, ctx, planner = setup
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    prompts = [[Segment.text(engine.chat_ids([{"role": "user", "content": q}]))]
               for q in QUESTIONS[:4]]
    alone = [_alone(engine, planner.run(ctx, p, "full"), params) for p in prompts]
    n_max = max(len(p[0].token_ids) for p in prompts) + 40
    # a pool that holds about two of these sequences at their full length
    s = engine.spec
    per_block = 2 * s.num_layers * s.num_kv_heads * 16 * s.head_dim * 4
    se = ServingEngine(engine, max_running=4, kv_bytes=per_block * (2 * (-(-n_max // 16)) + 2),
                       block_size=16).start()
    try:
        hs = [_submit(se, planner, ctx, p, "full", params) for p in prompts]
        got = [[c.token_id for c in h if c.token_id is not None] for h in hs]
    finally:
        se.close()
    assert se.stats["preemptions"] > 0
    assert got == alone  # swapping is exact


def test_cancel_frees_pages_and_oversized_prompts_are_refused(setup):
    engine, ctx, planner = setup
    se = ServingEngine(engine, max_running=4, kv_bytes=32 << 20).start()
    try:
        segs = [Segment.text(engine.chat_ids([{"role": "user", "content": "Tell a story."}]))]
        h = _submit(se, planner, ctx, segs, "full", SamplingParams(max_tokens=400,
                                                                   ignore_eos=True))
        it = iter(h)
        next(it)
        h.cancel()
        last = list(it)[-1]
        assert last.finish_reason == "cancelled"
        t0 = time.time()
        while se.pool.stats().used and time.time() - t0 < 10:
            time.sleep(0.05)
        assert se.pool.stats().used == 0
        with pytest.raises(InvalidInputError, match="pool holds"):
            _submit(se, planner, ctx, [Segment.text([1] * 100)], "full",
                    SamplingParams(max_tokens=se.capacity_tokens))
        bad = se.submit(EngineRequest(lambda: (_ for _ in ()).throw(InvalidInputError("boom")),
                                      SamplingParams(max_tokens=4), 4))
        with pytest.raises(InvalidInputError, match="boom"):
            list(bad)
        ok = _submit(se, planner, ctx, segs, "full", SamplingParams(max_tokens=3))
        assert list(ok)[-1].finish_reason in ("length", "stop")  # the engine goes on
    finally:
        se.close()


def test_shared_prefix_pages_are_mapped_not_copied(setup):
    engine, ctx, planner = setup
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    prompts = [_rag(engine, q) for q in QUESTIONS[:4]]  # same documents, same order
    se = ServingEngine(engine, max_running=8, kv_bytes=64 << 20).start()
    try:
        hs = [_submit(se, planner, ctx, p, "full", params) for p in prompts]
        got = [[c.token_id for c in h if c.token_id is not None] for h in hs]
    finally:
        se.close()
    alone = [_alone(engine, planner.run(ctx, p, "full"), params) for p in prompts]
    assert got == alone
    assert se.pool.shared_hits > 0
    assert se.stats["peak_blocks_used"] < se.stats["peak_blocks_mapped"]


def test_many_threads_submit_concurrently(setup):
    engine, ctx, planner = setup
    se = ServingEngine(engine, max_running=3, kv_bytes=64 << 20).start()
    out: dict = {}

    def client(i):
        segs = [Segment.text(engine.chat_ids([{"role": "user", "content": QUESTIONS[i]}]))]
        h = _submit(se, planner, ctx, segs, "full", SamplingParams(max_tokens=5))
        out[i] = "".join(c.text for c in h)

    try:
        ts = [threading.Thread(target=client, args=(i,)) for i in range(6)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(120)
    finally:
        se.close()
    assert len(out) == 6 and all(isinstance(v, str) for v in out.values())
    assert max(len(se.running), 0) == 0 and se.stats["prefills"] == 6


def test_deferred_answer_checks_run_when_the_engine_is_idle(setup):
    """With ``defer_checks`` a sampled request is served without waiting for its answer check;
    the serving engine runs the check afterwards, while nothing else is waiting or running."""
    from ctxcache.fusion.judge import AnswerJudge

    engine, ctx, _ = setup
    planner = Planner(default_strategies(), default="cacheblend", sample_rate=1.0,
                      judge=AnswerJudge(engine, tokens=4), defer_checks=True, seed=0)
    se = ServingEngine(engine, max_running=2, kv_bytes=64 << 20)
    se.idle_work = planner.run_deferred
    se.start()
    try:
        segs = _rag(engine, QUESTIONS[0])
        h = _submit(se, planner, ctx, segs, None, SamplingParams(max_tokens=4))
        text = "".join(c.text for c in h)
        assert isinstance(text, str) and planner.describe()["served"] == {"cacheblend": 1}
        # settle() returns once the engine is idle with its background work done
        assert se.settle(timeout=120)
        report = planner.answer_report()
        assert se.settle(timeout=1)  # nothing new: at once
    finally:
        se.close()
    assert not planner.deferred
    assert sum(v["n"] for v in report.values()) == 1, report
    assert planner.describe()["dropped_checks"] == 0


def _chat_tokens(backend, messages, tenant, n=6):
    from service.backends import GenRequest

    stream = backend.generate(GenRequest(SamplingParams(max_tokens=n, ignore_eos=True), tenant,
                                         messages=messages))
    ids = [c.token_id for c in stream.chunks if c.token_id is not None]
    return ids, stream.info


def test_agent_loop_reuses_resident_pool_pages_exactly(engine):
    """Each step resends the conversation: it finds the previous step's prompt in the pool's
    pages (no store lookup) and prefills only the new messages — with the greedy tokens of full
    prefill. Another tenant never maps them; with the store emptied the pool alone serves."""
    from service.backends import EmbeddedBackend

    store = KVStore([MemoryTier(1 << 30)])
    backend = EmbeddedBackend(engine, store, max_running=2, kv_bytes=64 << 20)
    planner = Planner(default_strategies(), default="full", sample_rate=0.0)
    ctx = FusionContext(engine, KVStore([MemoryTier(1 << 30)]), "reference")
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    msgs = [{"role": "system", "content": "You are a research agent."},
            {"role": "user", "content": QUESTIONS[0]}]
    try:
        prev_prompt = 0
        for step, passage in enumerate(PASSAGES[:3]):
            got, info = _chat_tokens(backend, msgs, "agent")
            segs = backend._segments_for_chat(msgs)
            assert got == _alone(engine, planner.run(ctx, segs, "full"), params)
            pool = info["stats"].get("pool_tokens", 0)
            if step:  # the previous prompt, less its last partial block, came from the pool
                bs = backend.serving.pool.block_size
                assert pool >= (prev_prompt - 1) // bs * bs - bs and pool > 0
                assert info["cached_tokens"] >= pool
            else:
                assert pool == 0
            prev_prompt = info["prompt_tokens"]
            msgs = msgs + [{"role": "assistant", "content": engine.decode_ids(got)},
                           {"role": "user", "content": passage}]
        other, info = _chat_tokens(backend, msgs, "someone-else")
        assert "pool_tokens" not in info["stats"] and info["cached_tokens"] == 0
        store.delete_namespace("agent")
        again, info = _chat_tokens(backend, msgs, "agent")
        assert again == other  # exact either way
        assert info["stats"]["pool_tokens"] > 0 and info["stats"]["chunk_hits"] == 0
        # what the pool served was written back to the emptied store: without the pool, the
        # store alone serves the conversation
        backend.serving.pool_prefix = False
        last, info = _chat_tokens(backend, msgs, "agent")
        assert last == other and info["stats"]["chunk_hits"] > 0
        assert "pool_tokens" not in info["stats"]
        # as on a GPU: the rows after the pool's last block are recomputed, not read from the
        # store, whatever the store holds
        backend.serving.pool_prefix = True
        backend.planner.strategies["prefix"].store_slack_tokens = 1 << 30
        msgs = msgs + [{"role": "assistant", "content": engine.decode_ids(last)},
                       {"role": "user", "content": PASSAGES[3]}]
        ids, info = _chat_tokens(backend, msgs, "agent")
        segs = backend._segments_for_chat(msgs)
        assert ids == _alone(engine, planner.run(ctx, segs, "full"), params)
        st = info["stats"]
        assert st["chunk_hits"] == 0 and st["pool_tokens"] % backend.serving.pool.block_size == 0
        assert st["pool_tokens"] > prev_prompt
    finally:
        backend.close()
