"""KVCOMM on the real model: anchors, estimates, bounds, tenancy, and the team API."""

from __future__ import annotations

import pytest

from ctxcache.agents.kvcomm import KVComm
from ctxcache.agents.team import Team
from ctxcache.fusion import FullPrefill, FusionContext, NaiveReuse, Segment, first_token_kl
from ctxcache.fusion.chunks import chunk_kv
from ctxcache.fusion.types import FusionStats
from ctxcache.kv import KVStore, MemoryTier

TPL = "<|im_start|>system\n{}<|im_end|>\n<|im_start|>user\n"
SYSTEMS = {"Alice": "You are Alice, a careful planner who lists the steps.",
           "Bob": "You are Bob, a tester who checks every claim.",
           "Carol": "You are Carol, a reviewer who summarises the decisions."}
MESSAGES = ["Alice: We need to move the database to the new cluster by Friday.\n\n",
            "Bob: The backup job failed twice last week; we should fix it first.\n\n",
            "Alice: Agreed. I will rerun the backup tonight and report back.\n\n"]
TURN = "Reply as {}, in one message.<|im_end|>\n<|im_start|>assistant\n"


def segs(engine, agent, messages=MESSAGES):
    return ([Segment.prefix(engine.encode(TPL.format(SYSTEMS[agent])))]
            + [Segment.chunk(engine.encode(m)) for m in messages]
            + [Segment.text(engine.encode(TURN.format(agent)))])


@pytest.fixture
def ctx(engine):
    c = FusionContext(engine, KVStore([MemoryTier(1 << 30)]), "team-a")
    for m in MESSAGES:  # as a team does when a message is said: encoded once, prefix-free
        chunk_kv(c, engine.encode(m), FusionStats("agent"))
    return c


def kv_err(a, b):
    return ((a.kv.k.float() - b.kv.k.float()).norm() / b.kv.k.float().norm()).item()


def test_pool_disabled_is_naive_and_full_recompute_is_no_sharing(ctx, engine):
    """Over the shared (prefix-free) encodings a team uses."""
    s = segs(engine, "Bob")
    naive, full = NaiveReuse().build(ctx, s), FullPrefill().build(ctx, s)
    off = KVComm(0.0, use_anchors=False).build(ctx, s)
    assert (off.logits - naive.logits).abs().max().item() <= 1e-3
    assert (off.kv.k - naive.kv.k).abs().max().item() <= 1e-3
    every = KVComm(1.0).build(ctx, s)
    assert (every.logits - full.logits).abs().max().item() <= 1e-3
    assert (every.kv.v - full.kv.v).abs().max().item() <= 1e-3


def test_anchors_from_one_agent_correct_another_agents_kv(ctx, engine):
    """Alice's turn calibrates the shared messages; Bob's and Carol's turns estimate their
    offsets from Alice's anchors: far closer to their exact K/V than naive reuse."""
    kv = KVComm(0.05)
    first = kv.build(ctx, segs(engine, "Alice"))
    assert first.stats.extra["routes"]["calibrate"] == len(MESSAGES)
    ctx.store.flush()
    for agent in ("Bob", "Carol"):
        s = segs(engine, agent)
        ref, nv = FullPrefill().build(ctx, s), NaiveReuse().build(ctx, s)
        r = kv.build(ctx, s)
        ctx.store.flush()
        assert r.stats.extra["routes"]["estimate"] >= 2
        assert kv_err(r, ref) < 0.3 * kv_err(nv, ref), agent
        assert first_token_kl(ref.logits, r.logits) < 0.3 * first_token_kl(ref.logits,
                                                                            nv.logits)
        assert r.stats.extra["shared_reuse_rate"] > 0.5
    # the same agent again: its exact K/V under this context is reused as is
    again = kv.build(ctx, segs(engine, "Alice"))
    assert again.stats.extra["routes"]["exact"] == len(MESSAGES)


def test_pool_bounds_eviction_restart_and_tenancy(ctx, engine):
    kv = KVComm(0.05, max_anchors=2, min_similarity=0.999)  # every context its own anchor
    ids = engine.encode(MESSAGES[0])
    for agent in ("Alice", "Bob", "Carol"):
        kv.build(ctx, segs(engine, agent, MESSAGES[:1]))
        ctx.store.flush()
    assert len(kv.pool.anchors(ctx, ids)) == 2
    assert kv.pool.counters["replaced"] >= 1
    # a restarted process (fresh pool) finds the anchors in the store tiers
    fresh = KVComm(0.05, max_anchors=2, min_similarity=0.999)
    assert len(fresh.pool.anchors(ctx, ids)) == 2
    r = fresh.build(ctx, segs(engine, "Carol", MESSAGES[:1]))
    assert r.stats.extra["routes"]["estimate"] + r.stats.extra["routes"]["exact"] == 1
    # another tenant sees none of them
    other = FusionContext(engine, ctx.store, "team-b")
    assert fresh.pool.anchors(other, ids) == []
    assert KVComm(0.05).build(other, segs(engine, "Carol", MESSAGES[:1])).stats.extra[
        "routes"]["calibrate"] == 1


def test_team_python_api(engine):
    team = Team(engine, {a: s for a, s in SYSTEMS.items()}, shared_context="Project: migration.")
    team.say("user", "We must move the database by Friday. Who does what?")
    a = team.generate("Alice", max_tokens=12)
    b = team.generate("Bob", max_tokens=12)
    assert a.text and b.text and len(team.session.messages) == 3
    assert b.stats["strategy"] == "kvcomm" and b.stats["reused_tokens"] > 0
