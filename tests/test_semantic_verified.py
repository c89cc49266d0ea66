"""Verified thresholds (vCache-style): learned online from checked outcomes under an error bound.

Real MiniLM embeddings, real hnswlib and SQLite; outcomes go through ``record_outcome`` with the
default judge (the embedder comparing answer texts), as the gateway feeds them.
"""

from __future__ import annotations

import math

import pytest

from ctxcache.errors import InvalidInputError
from ctxcache.semantic import CacheRequest, HnswParams, SemanticCache
from ctxcache.semantic.verified import VerifiedThresholds, wilson_upper

STORED = "How do I reverse a list in Python?"
PARAPHRASE = "hey so how to reverse a python list"
ANSWER = {"text": "Use my_list.reverse() to reverse in place, or my_list[::-1] for a copy."}
WRONG = {"text": "Paris is the capital of France."}


@pytest.fixture(scope="module")
def embedder():
    from ctxcache.semantic import TransformerEmbedder

    return TransformerEmbedder()


@pytest.fixture
def cache(embedder, tmp_path):
    c = SemanticCache(embedder, db_url=f"sqlite:///{tmp_path}/v.db", verify_rate=0.25, seed=0)
    yield c
    c.close()


def _req(text: str, tenant: str = "t1") -> CacheRequest:
    return CacheRequest(text, tenant=tenant, category="code")


def test_wilson_upper_bound_matches_closed_forms():
    z = 1.645
    assert wilson_upper(0, 30) == pytest.approx(z * z / (30 + z * z), rel=1e-9)
    assert wilson_upper(0, 0) == 1.0
    # many observations: the bound approaches the rate from above
    assert 0.10 < wilson_upper(1000, 10_000) < 0.10 + 2 * z * math.sqrt(0.09 / 10_000)


def _learn_to_serve(cache, res, n: int = 60) -> None:
    for _ in range(n):
        assert cache.record_outcome(res, ANSWER) is True


def test_cold_start_explores_instead_of_serving(cache, embedder):
    sim = float(embedder.embed([STORED])[0] @ embedder.embed([PARAPHRASE])[0])
    cache.set_policy("code", {"threshold": 0.9, "min_threshold": 0.9, "max_error_rate": 0.05})
    cache.insert(_req(STORED), ANSWER)
    # no evidence yet: even the exact question is not served, it is explored (the backend
    # answers it and the answer is compared with the candidate's)
    for text, s in ((STORED, 1.0), (PARAPHRASE, sim)):
        res = cache.lookup(_req(text))
        assert res.hit is None and res.threshold > 1.0
        assert res.candidate is not None and res.candidate[1] == pytest.approx(s, abs=1e-4)
    # an unrelated request is below the exploration floor (threshold - 0.08): nothing to explore
    assert cache.lookup(_req("Which river flows through Vienna?")).candidate is None
    # without a bound: the static threshold serves, and there is never a candidate
    cache.set_policy("code", {"max_error_rate": None})
    res = cache.lookup(_req(PARAPHRASE))
    assert res.hit is not None and res.candidate is None


def test_agreeing_comparisons_unlock_serving_down_to_where_they_were_seen(cache, embedder):
    cache.insert(_req(STORED), ANSWER)
    sim = float(embedder.embed([STORED])[0] @ embedder.embed([PARAPHRASE])[0])
    cache.set_policy("code", {"threshold": 0.99, "min_threshold": 0.99, "max_error_rate": 0.05})
    res = cache.lookup(_req(PARAPHRASE))
    assert res.hit is None and res.candidate is not None
    # 0 errors in n passes the 5 % bound at 95 % confidence once n >= z^2 (1 - d) / d = 51.4
    for k in range(60):
        assert cache.record_outcome(res, {"text": ANSWER["text"]}) is True
        thr, floor, verified = cache.threshold_for("t1", "code")
        assert verified and floor < 0.99
        if k < 51:
            assert thr > 1.0  # not enough evidence yet: still exploring
    assert sim - 0.005 <= thr <= sim  # serves down to where agreement was observed
    hit = cache.lookup(_req(PARAPHRASE)).hit
    assert hit is not None and hit.response == ANSWER
    # another tenant has its own evidence: still exploring there
    cache.insert(_req(STORED, "t2"), ANSWER)
    assert cache.lookup(_req(PARAPHRASE, "t2")).hit is None
    report = [r for r in cache.verified_stats() if r["tenant"] == "t1" and r["category"] == "code"]
    assert report[0]["learned"] and report[0]["observations"] == 60
    assert report[0]["error_rate_upper_95"] <= 0.05


def test_wrong_answers_block_the_entry_and_raise_the_threshold(cache):
    cache.insert(_req(STORED), ANSWER)
    cache.set_policy("code", {"threshold": 0.8, "min_threshold": 0.8, "max_error_rate": 0.05})
    _learn_to_serve(cache, cache.lookup(_req(STORED)))  # evidence at similarity 1.0
    _learn_to_serve(cache, cache.lookup(_req(PARAPHRASE)))
    res = cache.lookup(_req(PARAPHRASE))
    assert res.hit is not None
    # a sampled verification finds it wrong: that entry is not served at that similarity again
    assert cache.record_outcome(res, WRONG) is False
    assert cache.verifier.guard(res.hit.entry_id) == pytest.approx(res.hit.similarity)
    again = cache.lookup(_req(PARAPHRASE))
    assert again.hit is None and again.candidate[0] == res.hit.entry_id
    assert cache.lookup(_req(STORED)).hit is not None  # above the guard: still served
    # verified hits weigh 1/verify_rate: 60 wrong ones at 0.97 outweigh the agreeing evidence
    for _ in range(60):
        cache.verifier.observe("t1", "code", -1, 0.97, True, propensity=0.25)
    thr, _, _ = cache.threshold_for("t1", "code")
    assert thr > 0.97  # errors at 0.97 exceed the bound: serve only above them
    assert cache.stats_dict()["code"]["false_hits"] == 1


def test_learned_threshold_stops_where_errors_start():
    v = VerifiedThresholds(min_observations=30)
    for i in range(400):  # right above 0.85, wrong below 0.80 (half the time between)
        s = 0.75 + 0.25 * i / 400
        wrong = s < 0.80 or (s < 0.85 and i % 2 == 0)
        v.observe("t", "factual", i, s, wrong)
    thr, floor = v.decide("t", "factual", static=0.95, bound=0.05)
    assert 0.80 < thr < 0.9 and floor == pytest.approx(thr - 0.08)
    rep = v.report("t", "factual", 0.95, 0.05)
    assert rep["error_rate_upper_95"] <= 0.05 and rep["threshold"] == thr
    # a stricter tenant bound moves it up, never down
    v.set_max_error("t", "factual", 0.01)
    assert v.decide("t", "factual", static=0.95, bound=0.01)[0] >= thr
    # no evidence at all: nothing served
    assert v.decide("t", "code", static=0.9, bound=0.05) == (2.0, pytest.approx(0.82))


def test_bad_configuration_is_a_typed_error(cache):
    with pytest.raises(InvalidInputError):
        cache.set_policy("code", {"max_error_rate": 1.5})
    with pytest.raises(InvalidInputError):
        cache.verifier.set_max_error("t1", "code", 0.0)
    with pytest.raises(InvalidInputError):
        cache.verifier.observe("t1", "code", 1, 0.9, False, propensity=0.0)
    with pytest.raises(InvalidInputError):
        SemanticCache(cache.embedder, db_url="sqlite://", verify_rate=2.0)
    with pytest.raises(InvalidInputError):
        HnswParams(M=0)
    with pytest.raises(InvalidInputError):
        HnswParams(ef=0)
