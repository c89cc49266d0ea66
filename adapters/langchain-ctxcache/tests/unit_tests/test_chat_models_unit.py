"""LangChain's standard unit tests for chat models (no server needed)."""

from langchain_tests.unit_tests import ChatModelUnitTests

from langchain_ctxcache import ChatCtxCache


class TestChatCtxCacheUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self):
        return ChatCtxCache

    @property
    def chat_model_params(self):
        return {"model": "default", "base_url": "http://127.0.0.1:9/v1"}

    @property
    def has_tool_calling(self):
        return False  # the gateway's small models do not call tools

    @property
    def has_structured_output(self):
        return False

    @property
    def init_from_env_params(self):
        return ({"CTXCACHE_BASE_URL": "http://gateway.example:8000/v1",
                 "CTXCACHE_API_KEY": "tenant-key"},
                {},
                {"openai_api_base": "http://gateway.example:8000/v1",
                 "openai_api_key": "tenant-key"})


def test_extras_go_to_the_request_body():
    llm = ChatCtxCache(base_url="http://127.0.0.1:9/v1", category="code", semantic_cache=False,
                       document_ids=["d1"])
    payload = llm._get_request_payload("hi", strategy="cacheblend", passages=["p"])
    assert payload["extra_body"] == {"cache": False, "category": "code",
                                     "document_ids": ["d1"], "passages": ["p"],
                                     "strategy": "cacheblend"}
    assert "strategy" not in payload and payload["messages"][0]["content"] == "hi"
    assert "extra_body" not in ChatCtxCache(base_url="http://127.0.0.1:9/v1",
                                            semantic_cache=True)._get_request_payload("hi") \
        or ChatCtxCache(base_url="http://127.0.0.1:9/v1")._get_request_payload(
            "hi")["extra_body"] == {"cache": True}


def test_cache_key_split():
    import json

    from langchain_core.load import dumps
    from langchain_core.messages import HumanMessage, SystemMessage

    from langchain_ctxcache.cache import split_prompt

    a = dumps([SystemMessage("Be brief."), HumanMessage("What is the capital of France?")])
    b = dumps([SystemMessage("Be verbose."), HumanMessage("What is the capital of France?")])
    ta, sa = split_prompt(a, "llm")
    tb, sb = split_prompt(b, "llm")
    assert ta == tb == "What is the capital of France?" and sa != sb
    assert split_prompt(a, "other-llm")[1] != sa
    assert split_prompt("plain prompt", "llm")[0] == "plain prompt"
    assert json.loads(a)  # the prompt LangChain hands to caches is this JSON
