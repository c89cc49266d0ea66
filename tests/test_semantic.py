"""Semantic cache: real MiniLM embeddings, real hnswlib, real SQLite and PostgreSQL."""

from __future__ import annotations

import os
import uuid

import numpy as np
import pytest

from ctxcache.errors import InvalidInputError
from ctxcache.semantic import (
    CacheRequest, CentroidClassifier, LoadAdapter, SemanticCache, context_fingerprint,
    load_examples, make_policy,
)

PG_URL = os.environ.get("CTXCACHE_TEST_PG", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="session")
def embedder():
    from ctxcache.semantic import TransformerEmbedder

    return TransformerEmbedder()


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def cache(embedder, tmp_path, clock):
    c = SemanticCache(embedder, db_url=f"sqlite:///{tmp_path}/sem.db", index_dir=tmp_path / "idx",
                      clock=clock)
    yield c
    c.close()


def pg_available() -> bool:
    try:
        from sqlalchemy import create_engine, text

        with create_engine(PG_URL).connect() as conn:
            conn.execute(text("select 1"))
        return True
    except Exception:  # noqa: BLE001
        return False


def test_embeddings_are_normalised_and_meaningful(embedder):
    v = embedder.embed(["How do I reverse a list in Python?", "Reverse a python list",
                        "What is the capital of France?"])
    assert v.shape == (3, 384)
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-4)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.3


def test_classifier_accuracy_on_held_out_examples(embedder):
    ex = load_examples()
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(ex))
    train, test = idx[: int(0.7 * len(ex))], idx[int(0.7 * len(ex)):]
    emb = embedder.embed([t for t, _ in ex])
    labels = np.array([c for _, c in ex])
    clf = CentroidClassifier.train(emb[train], labels[train])
    acc = clf.accuracy(emb[test], labels[test])
    assert acc >= 0.75, acc


def test_shipped_classifier_keeps_categories_under_casual_rewrites(cache, embedder):
    """The shipped weights (trained on ~1.6K questions + casual rewrites) are used with the
    packaged embedder, and a sloppy rewrite rarely changes a question's category."""
    import random

    from ctxcache.semantic.classifier import load_trained
    from ctxcache.semantic.rewrite import casual

    clf = load_trained(embedder.name, embedder.dim, cache.categories)
    assert clf is not None and cache.router.classifier.weights.shape == clf.weights.shape
    texts = [t for t, _ in load_examples()]
    rng = random.Random(7)
    rewrites = [casual(t, rng) for t in texts]
    assert sum(a != b for a, b in zip(texts, rewrites)) > 0.8 * len(texts)
    before = clf.predict(embedder.embed(texts))
    after = clf.predict(embedder.embed(rewrites))
    flips = sum(a != b for a, b in zip(before, after)) / len(texts)
    assert flips <= 0.1, flips


def test_paraphrase_hits_and_unrelated_misses(cache):
    cache.insert(CacheRequest("How do I reverse a list in Python?"), {"text": "list[::-1]"})
    hit = cache.lookup(CacheRequest("how to reverse a list in python")).hit
    assert hit is not None and hit.response == {"text": "list[::-1]"}
    assert cache.lookup(CacheRequest("How do I sort a dictionary by value?")).hit is None
    s = cache.stats_dict()["code"]
    assert s["lookups"] == 2 and s["hits"] == 1 and s["inserts"] == 1


def test_per_category_thresholds(cache):
    # same pair of texts: hits under a loose policy, misses under a strict one
    q1, q2 = "What is the boiling point of water?", "At what temperature does water boil?"
    cache.insert(CacheRequest(q1, category="factual"), {"text": "100 C"})
    sim = cache.lookup(CacheRequest(q2, category="factual")).embedding @ cache.embed(q1)
    cache.set_policy("factual", {"threshold": float(sim) - 0.01, "min_threshold": None})
    assert cache.lookup(CacheRequest(q2, category="factual")).hit is not None
    cache.set_policy("factual", {"threshold": min(1.0, float(sim) + 0.01)})
    assert cache.lookup(CacheRequest(q2, category="factual")).hit is None


def test_paraphrase_in_another_category_is_found_under_the_stricter_policy(cache, clock):
    """Categories decide policy, not where to look: a paraphrase classified into another
    category still finds the stored entry, which must pass its own threshold and TTL too."""
    q1, q2 = "Who wrote Pride and Prejudice?", "hey so who wrote pride and prejudice lol"
    cache.insert(CacheRequest(q1, category="factual"), {"text": "Jane Austen"})
    sim = float(cache.embed(q2) @ cache.embed(q1))
    for c in ("factual", "conversation"):
        cache.set_policy(c, {"threshold": sim - 0.02, "min_threshold": None})
    hit = cache.lookup(CacheRequest(q2, category="conversation")).hit
    assert hit is not None and hit.response == {"text": "Jane Austen"}
    # the stored entry's category is stricter: no hit although the query's policy allows it
    cache.set_policy("factual", {"threshold": min(1.0, sim + 0.02)})
    assert cache.lookup(CacheRequest(q2, category="conversation")).hit is None
    cache.set_policy("factual", {"threshold": sim - 0.02, "ttl_s": 30, "max_ttl_s": None})
    clock.t += 31  # the entry's own TTL has passed: expired for every query
    assert cache.lookup(CacheRequest(q2, category="conversation")).hit is None
    assert cache.count() == 0


def test_ttl_expiry_with_injected_clock(cache, clock):
    cache.set_policy("conversation", {"ttl_s": 60, "max_ttl_s": None, "threshold": 0.9,
                                      "min_threshold": None})
    cache.insert(CacheRequest("hi there, how are you?", category="conversation"), {"text": "fine"})
    assert cache.lookup(CacheRequest("hi there, how are you?", category="conversation")).hit
    clock.t += 61
    assert cache.lookup(CacheRequest("hi there, how are you?", category="conversation")).hit is None
    assert cache.stats_dict()["conversation"]["expired"] == 1
    assert cache.count() == 0


def test_quota_evicts_least_recently_hit(cache, clock):
    cache.set_policy("math", {"max_entries": 2})
    qs = ["What is 17 times 23?", "Solve 3x + 5 = 20 for x.", "What is the square root of 144?"]
    ids = []
    for q in qs[:2]:
        ids.append(cache.insert(CacheRequest(q, category="math"), {"text": q}))
        clock.t += 1
    assert cache.lookup(CacheRequest(qs[0], category="math")).hit  # refresh the first entry
    clock.t += 1
    ids.append(cache.insert(CacheRequest(qs[2], category="math"), {"text": qs[2]}))
    assert cache.lookup(CacheRequest(qs[1], category="math")).hit is None
    assert cache.lookup(CacheRequest(qs[0], category="math")).hit is not None
    assert cache.stats_dict()["math"]["evictions"] == 1
    cache.set_policy("math", {"max_entries": 100, "max_bytes": 10})
    assert cache.insert(CacheRequest("What is 2 + 2?", category="math"), {"text": "4" * 50}) is None


def test_uncacheable_category_and_bad_outcomes(cache):
    assert cache.insert(CacheRequest("Write a poem about the sea", category="creative"),
                        {"text": "..."}) is None
    assert cache.insert(CacheRequest("What is DNA?"), {"text": "cut"}, finish_reason="length") is None
    assert cache.insert(CacheRequest("What is DNA?"), {"text": "x"}, error=True) is None
    assert cache.count() == 0


def test_context_fingerprint_separates_requests(cache):
    fa = context_fingerprint(documents=["doc-a"])
    fb = context_fingerprint(documents=["doc-b"])
    ft = context_fingerprint(temperature=0.7)
    assert len({fa, fb, ft, context_fingerprint()}) == 4
    q = "What does the report say about revenue?"
    cache.insert(CacheRequest(q, context_fp=fa, doc_ids=["doc-a"]), {"text": "up 5%"})
    assert cache.lookup(CacheRequest(q, context_fp=fa)).hit is not None
    assert cache.lookup(CacheRequest(q, context_fp=fb)).hit is None
    assert cache.lookup(CacheRequest(q)).hit is None


def test_tenant_isolation(cache):
    cache.insert(CacheRequest("What is the capital of Peru?", tenant="acme"), {"text": "Lima"})
    assert cache.lookup(CacheRequest("What is the capital of Peru?", tenant="acme")).hit
    assert cache.lookup(CacheRequest("What is the capital of Peru?", tenant="other")).hit is None


def test_invalidation_by_id_category_tenant_document(cache):
    a = cache.insert(CacheRequest("What is the capital of Peru?", doc_ids=["d1"]), {"text": "Lima"})
    cache.insert(CacheRequest("Who wrote Hamlet?", doc_ids=["d2"]), {"text": "Shakespeare"})
    cache.insert(CacheRequest("How do I reverse a list in Python?"), {"text": "[::-1]"})
    cache.insert(CacheRequest("What is the capital of Peru?", tenant="t2"), {"text": "Lima"})
    assert cache.invalidate(doc_id="d2") == 1
    assert cache.invalidate(entry_id=a) == 1
    assert cache.invalidate(category="code") == 1
    assert cache.invalidate(tenant="t2") == 1
    assert cache.count() == 0
    with pytest.raises(InvalidInputError):
        cache.invalidate()


def test_load_adaptive_relaxes_and_tightens(cache):
    ad = LoadAdapter(enabled=True)
    cache.load = ad
    p = cache.policies["factual"]
    ad.set_load(0.0)
    assert ad.threshold(p) == p.threshold and ad.ttl(p) == p.ttl_s
    ad.set_load(1.0)
    assert ad.threshold(p) == p.min_threshold and ad.ttl(p) == p.max_ttl_s
    for _ in range(20):
        ad.observe(queue_depth=0, capacity=8)
    assert ad.load < 0.01
    for _ in range(20):
        ad.observe(queue_depth=16, capacity=8)
    assert ad.load > 0.95
    with pytest.raises(InvalidInputError):
        ad.set_load(2)


def test_bad_inputs(cache):
    with pytest.raises(InvalidInputError, match="empty"):
        cache.lookup(CacheRequest("   "))
    with pytest.raises(InvalidInputError, match="exceeds"):
        cache.lookup(CacheRequest("x" * 40_000))
    with pytest.raises(InvalidInputError, match="unknown category"):
        cache.lookup(CacheRequest("hello", category="poetry"))
    with pytest.raises(InvalidInputError, match="threshold"):
        cache.set_policy("code", {"threshold": 1.5})
    with pytest.raises(InvalidInputError, match="min_threshold"):
        make_policy({"threshold": 0.8, "min_threshold": 0.9})
    with pytest.raises(InvalidInputError):
        make_policy({"ttl_s": -1})
    with pytest.raises(InvalidInputError):
        cache.lookup(CacheRequest("hello", tenant="bad tenant!"))
    with pytest.raises(InvalidInputError, match="surrogate"):
        cache.lookup(CacheRequest("hello \udcff"))


def test_verification_feeds_false_hit_estimate(cache):
    cache.record_verification("code", True)
    cache.record_verification("code", False)
    assert cache.stats_dict()["code"]["false_hit_rate_estimate"] == 0.5


def _persistence_roundtrip(embedder, url, tmp_path):
    tenant = f"t{uuid.uuid4().hex[:8]}"
    c1 = SemanticCache(embedder, db_url=url, index_dir=tmp_path / "idx")
    c1.insert(CacheRequest("How do I reverse a list in Python?", tenant=tenant), {"text": "a"})
    c1.insert(CacheRequest("Who painted the Mona Lisa?", tenant=tenant), {"text": "b"})
    c1.close()
    c2 = SemanticCache(embedder, db_url=url, index_dir=tmp_path / "idx")
    hit = c2.lookup(CacheRequest("how to reverse a python list", tenant=tenant)).hit
    assert hit is not None and hit.response == {"text": "a"}
    c2.close()
    # without the saved index files the index is rebuilt from SQL
    c3 = SemanticCache(embedder, db_url=url, index_dir=tmp_path / "other-idx")
    assert c3.lookup(CacheRequest("Who painted the Mona Lisa?", tenant=tenant)).hit is not None
    c3.invalidate(tenant=tenant)
    c3.close()


def test_persistence_across_restart_sqlite(embedder, tmp_path):
    _persistence_roundtrip(embedder, f"sqlite:///{tmp_path}/p.db", tmp_path)


@pytest.mark.skipif(not pg_available(), reason="PostgreSQL not reachable")
def test_persistence_across_restart_postgres(embedder, tmp_path):
    _persistence_roundtrip(embedder, PG_URL, tmp_path)


def test_language_gate_keeps_uncovered_languages_out(embedder, tmp_path):
    """The English embedder crowds Thai questions together (unrelated ones hit each other);
    the default language gate serves such texts uncached, and English is unaffected."""
    stored, other = "กรุงเทพมีประชากรเท่าไหร่", "ช้างกินอะไร"  # unrelated questions
    ungated = SemanticCache(embedder, db_url=f"sqlite:///{tmp_path}/a.db", language_gate=None)
    ungated.insert(CacheRequest(stored), {"text": "x"})
    assert ungated.lookup(CacheRequest(other)).hit is not None  # the failure the gate prevents
    gated = SemanticCache(embedder, db_url=f"sqlite:///{tmp_path}/b.db")
    assert gated.insert(CacheRequest(stored), {"text": "x"}) is None
    res = gated.lookup(CacheRequest(stored))
    assert res.hit is None and not res.cacheable
    assert gated.stats_dict()[res.category]["uncovered_language"] >= 1
    q = "What is the boiling point of water?"
    assert gated.insert(CacheRequest(q), {"text": "100 °C"}) is not None
    assert gated.lookup(CacheRequest(q)).hit is not None
    ungated.close()
    gated.close()
