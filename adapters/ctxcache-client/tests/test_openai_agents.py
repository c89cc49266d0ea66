"""A two-agent team of the OpenAI Agents SDK on the gateway (Qwen2.5-Coder-0.5B-Instruct, whose
chat template has a tool format): a researcher that must call a real tool, then a writer that
receives the researcher's whole conversation (call and tool result included) and answers from
it. The SDK drives both through ``/v1/chat/completions`` with ``tools``."""

import asyncio

import pytest

agents = pytest.importorskip("agents")
from openai import AsyncOpenAI  # noqa: E402

from ctxcache_client.testing import live_gateway  # noqa: E402

QWEN = "qwen2.5-coder-0.5b-instruct"


@pytest.fixture(scope="module")
def qwen_url():
    with live_gateway(env={"CTXCACHE_MODEL": QWEN, "CTXCACHE_SEMANTIC_CACHE": "false"}) as url:
        yield url


def test_research_team_uses_a_tool_and_hands_over(qwen_url):
    agents.set_tracing_disabled(True)
    calls = []

    @agents.function_tool
    def population(city: str) -> str:
        """The number of inhabitants of a city."""
        calls.append(city)
        return {"springfield": "167882"}.get(city.lower(), "unknown")

    model = agents.OpenAIChatCompletionsModel(
        model=QWEN, openai_client=AsyncOpenAI(base_url=qwen_url + "/v1", api_key="none"))
    # the researcher's answer is its tool's result (the SDK's stop_on_first_tool): a 0.5B model
    # otherwise keeps calling the tool instead of replying
    researcher = agents.Agent(
        name="researcher",
        instructions="Look facts up with your tools, then state the fact in one sentence.", tools=[population],
        model=model, tool_use_behavior="stop_on_first_tool",
        model_settings=agents.ModelSettings(temperature=0, max_tokens=96))
    writer = agents.Agent(
        name="writer", instructions="Rewrite the team's findings as one short headline.",
        model=model, model_settings=agents.ModelSettings(temperature=0, max_tokens=48))

    async def run():
        r1 = await agents.Runner.run(researcher, "What is the population of Springfield?",
                                     max_turns=3)
        r2 = await agents.Runner.run(
            writer, r1.to_input_list() + [{"role": "user", "content": "Writer: headline please."}],
            max_turns=2)
        return r1, r2

    r1, r2 = asyncio.run(asyncio.wait_for(run(), 600))
    assert [c.lower() for c in calls] == ["springfield"]
    assert r1.final_output == "167882"
    assert "167" in r2.final_output.replace(",", "")  # the writer read the tool result
    assert r1.context_wrapper.usage.input_tokens > 0  # usage comes back through the SDK
