"""Two gateway replicas (two ``ctxcache serve`` processes) on one PostgreSQL + Redis — the
distributed set-up of the README: an answer cached through A is a hit on B within a bound,
documents and chunk K/V ingested through A are reused by B (through the Redis tier: the disk
tier is off), and a flush on A reaches B."""

from __future__ import annotations

import os
import time
import uuid

import httpx
import pytest

PG = os.environ.get("CTXCACHE_TEST_PG", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
REDIS = os.environ.get("CTXCACHE_TEST_REDIS_REPLICAS", "redis://127.0.0.1:6379/7")
SYNC_S = 0.5


def _services() -> str | None:
    try:
        import redis
        from sqlalchemy import create_engine, text

        with create_engine(PG).connect() as c:
            c.execute(text("select 1"))
        redis.Redis.from_url(REDIS).ping()
    except Exception as e:  # noqa: BLE001
        return f"PostgreSQL or Redis not reachable: {e}"
    return None


@pytest.fixture(scope="module")
def replicas():
    why = _services()
    if why:
        pytest.skip(why)
    testing = pytest.importorskip("ctxcache_client.testing")
    import redis
    from sqlalchemy import create_engine, text

    db = "ctxcache_replicas_" + uuid.uuid4().hex[:8]
    admin = create_engine(PG, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f"CREATE DATABASE {db}"))
    url = PG.rsplit("/", 1)[0] + "/" + db
    r = redis.Redis.from_url(REDIS)
    r.flushdb()
    env = {"CTXCACHE_DATABASE_URL": url, "CTXCACHE_REDIS_URL": REDIS,
           "CTXCACHE_SEMANTIC_SYNC_S": str(SYNC_S), "CTXCACHE_KV_DISK_BYTES": "0",
           "CTXCACHE_TEST_URL": ""}
    try:
        with testing.live_gateway(env) as a, testing.live_gateway(env) as b:
            yield a, b
    finally:
        r.flushdb()
        with admin.connect() as c:
            c.execute(text(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)"))


def chat(url: str, q: str, **kw) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json={
        "model": "default", "messages": [{"role": "user", "content": q}], "max_tokens": 48,
        **kw}, timeout=300)


def test_entry_cached_on_a_is_a_hit_on_b_within_bound(replicas):
    a, b = replicas
    q = {"prompt": "What is the chemical symbol for gold?", "scope": "replicas"}
    assert httpx.post(b + "/v1/cache/lookup", json=q).json()["hit"] is False
    assert httpx.post(a + "/v1/cache/entries", json={**q, "value": "Au"}).json()["stored"]
    t0 = time.monotonic()
    while not httpx.post(b + "/v1/cache/lookup", json=q).json()["hit"]:
        assert time.monotonic() - t0 < 4 * SYNC_S + 2, "B never learned A's entry"
        time.sleep(0.05)
    lag = time.monotonic() - t0
    print(f"replica B learned A's entry after {lag:.2f}s (sync every {SYNC_S}s)")
    assert lag <= 2 * SYNC_S + 1.0, f"propagation took {lag:.2f}s"
    # the same through the OpenAI endpoint: generated on A, a semantic hit on B
    question = "Which planet is closest to the Sun?"
    first = chat(a, question)
    assert first.headers["x-ctxcache-cache"] == "miss"
    time.sleep(2 * SYNC_S + 0.5)
    second = chat(b, question)
    assert second.headers["x-ctxcache-cache"] == "semantic-hit", second.json()
    assert second.json()["choices"][0]["message"]["content"] == \
        first.json()["choices"][0]["message"]["content"]


def test_documents_and_chunk_kv_ingested_on_a_are_reused_by_b(replicas):
    a, b = replicas
    doc = ("The Atacama Desert in northern Chile is one of the driest places on Earth; some of "
           "its weather stations have never recorded rain.")
    did = httpx.post(a + "/v1/documents", json={"documents": [{"text": doc}]},
                     timeout=300).json()["data"][0]["id"]
    assert httpx.get(b + f"/v1/documents/{did}").status_code == 200  # same SQL
    before = _redis_hits(b)
    ans = httpx.post(b + "/v1/rag", json={"question": "Which desert is one of the driest?",
                                          "document_ids": [did], "max_tokens": 16,
                                          "cache": False}, timeout=300).json()
    assert "Atacama" in ans["answer"] and ans["ctxcache"]["reused_tokens"] > 0
    assert _redis_hits(b) > before, "B loaded A's chunk K/V from Redis"


def test_flush_on_a_reaches_b(replicas):
    a, b = replicas
    question = "What is the largest ocean on Earth?"
    chat(a, question)
    time.sleep(2 * SYNC_S + 0.5)
    assert chat(b, question).headers["x-ctxcache-cache"] == "semantic-hit"
    flushed = httpx.post(a + "/v1/cache/flush", json={"tenant": "default"}).json()
    assert flushed["semantic_entries_removed"] >= 1
    # B's index still holds the id, but the row is gone: never served
    assert chat(b, question, cache=True).headers["x-ctxcache-cache"] == "miss"


def _redis_hits(url: str) -> int:
    tiers = httpx.get(url + "/v1/cache/stats").json()["kv"]["tiers"]
    return sum(t["hits"] for t in tiers if t["name"] == "redis")
