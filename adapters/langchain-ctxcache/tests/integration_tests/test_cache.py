"""LangChain's standard cache suites against the gateway's semantic cache, and the cache in
front of a real chat model call."""

import pytest
from langchain_core.globals import set_llm_cache
from langchain_tests.integration_tests.cache import AsyncCacheTestSuite, SyncCacheTestSuite

from langchain_ctxcache import ChatCtxCache, CtxCacheSemanticCache


class TestCtxCacheSemanticCacheSync(SyncCacheTestSuite):
    @pytest.fixture
    def cache(self, gateway_url):
        c = CtxCacheSemanticCache(gateway_url)
        yield c
        c.clear(scopes=[_scope()])


class TestCtxCacheSemanticCacheAsync(AsyncCacheTestSuite):
    @pytest.fixture
    async def cache(self, gateway_url):
        c = CtxCacheSemanticCache(gateway_url)
        yield c
        await c.aclear(scopes=[_scope()])


def _scope() -> str:
    from langchain_ctxcache.cache import split_prompt

    return split_prompt("Sample prompt for testing.", "Sample LLM string configuration.")[1]


def test_llm_cache_serves_paraphrase_without_a_model_call(gateway_url):
    cache = CtxCacheSemanticCache(gateway_url)
    set_llm_cache(cache)
    try:
        llm = ChatCtxCache(max_tokens=16, semantic_cache=False)  # gateway-side cache off
        first = llm.invoke("How many legs does a spider have?")
        again = llm.invoke("how many legs does a spider have")
        assert again.content == first.content
        # the second answer came from LangChain's cache: no gateway generation happened
        assert again.response_metadata.get("ctxcache") == first.response_metadata.get(
            "ctxcache")
        other_model = ChatCtxCache(max_tokens=8, semantic_cache=False)  # other llm_string
        assert cache.lookup(*_prompt_for(other_model, "How many legs does a spider have?")
                            ) is None
    finally:
        cache.clear()
        set_llm_cache(None)


def _prompt_for(llm, text):
    from langchain_core.load import dumps
    from langchain_core.messages import HumanMessage

    return dumps([HumanMessage(text)]), llm._get_llm_string()
