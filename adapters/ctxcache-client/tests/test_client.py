"""The client against a real gateway (``ctxcache serve``): every endpoint, sync and async."""

import pytest

from ctxcache_client import AsyncClient, Client, CtxCacheAPIError

DOC = ("Lake Baikal in Siberia is the deepest lake in the world, with a maximum depth of "
       "1,642 metres.")


def test_documents_rag_and_errors(gateway_url):
    with Client(gateway_url + "/v1") as c:  # the OpenAI-style base URL works too
        assert c.models()["data"]
        (doc,) = c.add_documents([{"text": DOC, "title": "baikal"}])
        assert doc["chunks"] >= 1 and doc["tokens"] > 0
        ans = c.rag("Which lake is the deepest in the world?", document_ids=[doc["id"]],
                    max_tokens=16, cache=False)
        assert "Baikal" in ans["answer"] and ans["ctxcache"]["reused_tokens"] > 0
        assert any(d["id"] == doc["id"] for d in c.list_documents()["data"])
        with pytest.raises(CtxCacheAPIError) as e:
            c.rag("q?", document_ids=["no-such-doc"])
        assert e.value.status == 404 and e.value.message
        with pytest.raises(CtxCacheAPIError) as e:
            c.rag("q?", passages=["p"], strategy="no-such-strategy")
        assert e.value.status == 400 and "strategy" in e.value.message
        assert c.delete_document(doc["id"])["deleted"]


def test_agent_session(gateway_url):
    with Client(gateway_url) as c:
        s = c.create_session({"writer": "You write one short sentence.",
                              "reviewer": "You answer OK or suggest one fix."},
                             shared_context="Topic: the water cycle.")
        c.post_message(s["id"], "writer", "Water evaporates, condenses into clouds and falls "
                                          "as rain.")
        out = c.generate(s["id"], "reviewer", max_tokens=12)
        assert out["content"] and out["ctxcache"]["reused_tokens"] > 0
        assert len(c.get_session(s["id"])["messages"]) == 2
        assert c.delete_session(s["id"])["deleted"]
        with pytest.raises(CtxCacheAPIError) as e:
            c.get_session(s["id"])
        assert e.value.status == 404


async def test_async_client_cache_roundtrip(gateway_url):
    async with AsyncClient(gateway_url) as c:
        scope = "client-test"
        await c.cache_clear(scope)
        assert (await c.cache_lookup("What is 2 + 2?", scope))["hit"] is False
        assert (await c.cache_put("What is 2 + 2?", {"answer": 4}, scope))["stored"]
        hit = await c.cache_lookup("What is 2 + 2?", scope)
        assert hit["hit"] and hit["value"] == {"answer": 4}
        assert (await c.cache_clear(scope))["removed"] == 1
