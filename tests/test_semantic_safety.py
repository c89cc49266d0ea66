"""Semantic cache safety: no answer served across differing hard keys (numbers, ids, names,
dates, units), and no answer served for another question over the same long passage.
Real MiniLM embedder, real hnswlib index, real SQLite; through the HTTP gateway too."""

from __future__ import annotations

import pydoc_data.topics

import httpx
import pytest

from ctxcache.semantic import CacheRequest, SemanticCache
from ctxcache.semantic.focus import split
from ctxcache.semantic.guard import differing_keys, keys_agree
from ctxcache.service.app import create_app
from test_service import MODEL, Server, make_gateway


@pytest.fixture(scope="module")
def embedder():
    from ctxcache.semantic import TransformerEmbedder

    return TransformerEmbedder()


@pytest.fixture()
def cache(embedder, tmp_path):
    c = SemanticCache(embedder, db_url=f"sqlite:///{tmp_path}/s.db")
    yield c
    c.close()


SWAPS = [  # (stored, asked): the answer differs, the cosine is high
    ("What is the status of order 48213?", "What is the status of order 48214?"),
    ("Who wrote Hamlet?", "Who wrote Macbeth?"),
    ("What happened in Paris on March 3, 2020?", "What happened in Paris on April 3, 2020?"),
    ("Convert 10 km to miles.", "Convert 12 km to miles."),
    ("Convert 10 km to miles.", "Convert 10 kg to pounds."),
    ("What does error E1042 mean?", "What does error E1043 mean?"),
    ("How do I install numpy 1.26?", "How do I install numpy 2.0?"),
    ("Summarize the \"Q3 revenue\" report", "Summarize the \"Q4 revenue\" report"),
    ("What is the population of Austria?", "What is the population of Australia?"),
    ("Email alice@example.com about the delay", "Email bob@example.com about the delay"),
]
PARAPHRASES = [
    ("Who wrote Hamlet?", "who wrote hamlet lol"),
    ("What is the status of order 48213?", "what's the status of order 48213"),
    ("Convert 10 km to miles.", "How many miles is 10 km?"),
    ("What's the capital of France?", "whats the capital of france??"),
    ("How do I reverse a string in Python?", "python: how can i reverse a string"),
    ("Is 1,000 bigger than 999?", "is 1000 bigger than 999"),
]


@pytest.mark.parametrize("stored,asked", SWAPS)
def test_swapped_keys_never_hit(cache, stored, asked):
    assert not keys_agree(stored, asked)
    cache.insert(CacheRequest(stored), {"text": "stored answer"})
    res = cache.lookup(CacheRequest(asked))
    assert res.hit is None, (stored, asked, res.hit and res.hit.similarity)
    assert cache.lookup(CacheRequest(stored)).hit is not None  # the entry itself still serves


@pytest.mark.parametrize("stored,asked", PARAPHRASES)
def test_paraphrases_keep_agreeing(stored, asked):
    assert keys_agree(stored, asked), differing_keys(stored, asked)


def test_guard_can_be_switched_off(embedder, tmp_path):
    c = SemanticCache(embedder, db_url=f"sqlite:///{tmp_path}/g.db", key_guard=False)
    c.insert(CacheRequest("What is the status of order 48213?"), {"text": "shipped"})
    assert c.lookup(CacheRequest("What is the status of order 48214?")).hit is not None
    c.close()


def _passage(n_chars: int) -> str:
    """Real English text (the Python reference's topic pages shipped with the stdlib)."""
    text = "\n".join(pydoc_data.topics.topics.values())
    return " ".join(text[:n_chars].split())


@pytest.mark.parametrize("tokens", [0, 60, 250, 1000, 2000, 4000])
def test_long_prompt_is_keyed_by_its_question(cache, tokens):
    """Passage + question in one message: another question over the same passage never
    matches (was a false hit every time from 250 tokens), the same question over another
    passage never matches, and the repeated prompt still does."""
    passage, other = _passage(4 * tokens), _passage(4 * tokens + 400)[400:]
    q1 = "Which statement is used to leave a loop early?"
    q2 = "What does the import statement do?"
    p1 = f"{passage}\n\n{q1}" if passage else q1
    cache.insert(CacheRequest(p1), {"text": "break"})
    assert cache.lookup(CacheRequest(p1)).hit is not None
    p2 = f"{passage}\n\n{q2}" if passage else q2
    assert cache.lookup(CacheRequest(p2)).hit is None
    if passage:
        assert cache.lookup(CacheRequest(f"{other}\n\n{q1}")).hit is None
        assert split(p1)[1] == q1
        # the same question asked in other words over the same passage still hits
        hit = cache.lookup(CacheRequest(f"{passage}\n\nWhich statement leaves a loop early?"))
        assert hit.hit is not None


def test_gateway_never_serves_another_orders_answer(engine, embedder, tmp_path):
    """The reported case: a client-side LLM cache (LangChain's, through ``ChatCtxCache``)
    asked for order 48214 and got the answer stored for order 48213."""
    gw = make_gateway(tmp_path, engine, embedder)
    srv = Server(create_app(gateway=gw))
    try:
        scope = {"scope": "model=x|temperature=0"}
        r = httpx.post(srv.url + "/v1/cache/entries", json={
            "prompt": "What is the status of order 48213?", "value": "shipped"} | scope)
        assert r.json()["stored"]

        def look(q):
            return httpx.post(srv.url + "/v1/cache/lookup", json={"prompt": q} | scope).json()

        assert look("what's the status of order 48213")["hit"] is True
        miss = look("What is the status of order 48214?")
        assert miss["hit"] is False and miss["value"] is None
        stats = gw.semantic.stats_dict()
        assert sum(s["key_refused"] for s in stats.values()) >= 1
    finally:
        srv.stop()
