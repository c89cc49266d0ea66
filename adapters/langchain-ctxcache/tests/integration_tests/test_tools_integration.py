"""Tool calling and structured output through LangChain on a gateway serving the real
Qwen2.5-Coder-0.5B-Instruct (its chat template has a tool format): LangChain's standard
integration suite with those capabilities declared ON, ``with_structured_output`` by all three
methods, and a LangGraph ReAct agent that must use a real tool to answer."""

import os

import pytest
from langchain_core.tools import tool
from langchain_tests.integration_tests import ChatModelIntegrationTests
from pydantic import BaseModel, Field

from ctxcache_client.testing import live_gateway
from langchain_ctxcache import ChatCtxCache

QWEN = "qwen2.5-coder-0.5b-instruct"


@pytest.fixture(scope="module")
def qwen_url():
    with live_gateway(env={"CTXCACHE_MODEL": QWEN, "CTXCACHE_SEMANTIC_CACHE": "false"}) as url:
        yield url + "/v1"


@pytest.fixture(autouse=True)
def _point_at_qwen(qwen_url, monkeypatch):
    monkeypatch.setenv("CTXCACHE_BASE_URL", qwen_url)


class TestChatCtxCacheToolsIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self):
        return ChatCtxCache

    @property
    def chat_model_params(self):
        return {"model": QWEN, "max_tokens": 128, "temperature": 0, "semantic_cache": False}

    @property
    def has_tool_calling(self):
        return True

    @property
    def has_tool_choice(self):
        return True

    @property
    def has_structured_output(self):
        return True

    @property
    def supports_json_mode(self):
        return True

    @property
    def returns_usage_metadata(self):
        return True

    @property
    def supported_usage_metadata_details(self):
        return {"invoke": [], "stream": []}

    @property
    def supports_model_override(self):
        return False  # one model per gateway: another name is refused (404), not switched to

    @pytest.mark.xfail(reason="model limitation (Qwen2.5-Coder-0.5B): with a non-ASCII name it "
                              "writes an unbounded description string until max_tokens; the "
                              "call is then cut, not malformed", strict=False)
    def test_unicode_tool_call_integration(self, *args, **kwargs):
        super().test_unicode_tool_call_integration(*args, **kwargs)


class Person(BaseModel):
    """A person."""

    name: str = Field(description="the person's first name")
    age: int = Field(description="age in years")


@pytest.mark.parametrize("method", ["json_schema", "function_calling", "json_mode"])
def test_with_structured_output_all_methods(qwen_url, method):
    llm = ChatCtxCache(model=QWEN, max_tokens=64, temperature=0, semantic_cache=False)
    structured = llm.with_structured_output(Person, method=method)
    prompt = "Alice is 31 years old. Extract the person."
    if method == "json_mode":
        prompt += " Answer in JSON with the keys name and age."
    out = structured.invoke(prompt)
    assert isinstance(out, Person) if method != "json_mode" else isinstance(out, (Person, dict))
    person = out if isinstance(out, Person) else Person(**out)
    assert person.age == 31 and person.name.lower().startswith("alice")


@tool
def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


def test_langgraph_react_agent_uses_a_real_tool(qwen_url):
    from langgraph.prebuilt import create_react_agent

    calls = []

    @tool
    def lookup_capital(country: str) -> str:
        """The capital city of a country."""
        calls.append(country)
        return {"france": "Paris", "japan": "Tokyo", "kenya": "Nairobi"}.get(
            country.strip().lower(), "unknown")

    llm = ChatCtxCache(model=QWEN, max_tokens=96, temperature=0, semantic_cache=False)
    agent = create_react_agent(llm, [lookup_capital, multiply])
    out = agent.invoke({"messages": [("user", "Use the lookup_capital tool: what is the capital "
                                              "of Kenya?")]}, {"recursion_limit": 8})
    assert calls and calls[0].lower() == "kenya"
    tool_msgs = [m for m in out["messages"] if m.type == "tool"]
    assert tool_msgs and tool_msgs[0].content == "Nairobi"
    # The 0.5B model often calls the tool again after its answer instead of replying, until
    # the recursion limit; the final reply is therefore not asserted (a model limitation, not
    # the protocol's: every step above went through the gateway's tool calling).
    assert all(m.type in ("human", "ai", "tool") for m in out["messages"])
