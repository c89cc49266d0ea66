"""LangChain's standard integration tests against a live gateway, plus ctxcache's extras."""

import pytest
from langchain_tests.integration_tests import ChatModelIntegrationTests

from langchain_ctxcache import ChatCtxCache


@pytest.fixture(autouse=True)
def _live(gateway_url):
    return gateway_url


class TestChatCtxCacheIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self):
        return ChatCtxCache

    @property
    def chat_model_params(self):
        # temperature 0 and no semantic cache: each test sees a real generation
        return {"model": "default", "max_tokens": 24, "temperature": 0, "semantic_cache": False}

    @property
    def has_tool_calling(self):
        return False

    @property
    def has_structured_output(self):
        return False

    @property
    def supports_json_mode(self):
        return False

    @property
    def returns_usage_metadata(self):
        return True

    @property
    def supported_usage_metadata_details(self):
        return {"invoke": [], "stream": []}


def test_document_grounded_answer_reuses_chunk_kv(gateway_url):
    from ctxcache_client import Client

    doc = ("Lake Baikal in Siberia is the deepest lake in the world, with a maximum depth of "
           "1,642 metres.")
    (d,) = Client(gateway_url).add_documents([doc])
    llm = ChatCtxCache(max_tokens=16, semantic_cache=False)
    msg = llm.invoke("Which lake is the deepest in the world?", document_ids=[d["id"]])
    meta = msg.response_metadata["ctxcache"]
    assert "Baikal" in msg.content
    assert meta["strategy"] and meta["reused_tokens"] > 0
    chunks = list(llm.bind(passages=[doc], strategy="full").stream(
        "Which lake is the deepest in the world?"))
    streamed = "".join(c.content for c in chunks)
    assert "Baikal" in streamed
    assert any("ctxcache" in c.response_metadata for c in chunks)


async def test_semantic_hit_through_langchain(gateway_url):
    llm = ChatCtxCache(max_tokens=128)
    q = [("system", "Answer in at most five words."),
         ("human", "What is the boiling point of water at sea level in Celsius?")]
    first = await llm.ainvoke(q)
    assert first.response_metadata["finish_reason"] == "stop"  # cut-off answers are not kept
    second = await llm.ainvoke(q)
    assert second.content == first.content
    assert second.response_metadata["ctxcache"]["cache"] == "semantic"
