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


def test_team_shares_document_context_through_chunk_reuse(qwen_url):
    """Two SDK agents with different instructions grounded on the same ingested document
    (``extra_body`` document_ids): the document's chunk K/V is computed once, at ingestion, and
    reused by both agents' requests — the SDK reports it as cached input tokens."""
    import httpx

    agents.set_tracing_disabled(True)
    doc = ("Springfield Annual Report. The city of Springfield has 167882 inhabitants. Its "
           "largest employer is the nuclear plant, with 2400 staff. The river Fox crosses the "
           "city from north to south. The town hall was built in 1796.")
    r = httpx.post(qwen_url + "/v1/documents", json={"documents": [
        {"text": doc, "title": "report"}]}, timeout=300)
    assert r.status_code == 200, r.text
    doc_id = r.json()["data"][0]["id"]
    model = agents.OpenAIChatCompletionsModel(
        model=QWEN, openai_client=AsyncOpenAI(base_url=qwen_url + "/v1", api_key="none"))
    grounded = agents.ModelSettings(temperature=0, max_tokens=32,
                                    extra_body={"document_ids": [doc_id]})
    analyst = agents.Agent(name="analyst", model=model, model_settings=grounded,
                           instructions="Answer from the documents with one number.")
    editor = agents.Agent(name="editor", model=model, model_settings=grounded,
                          instructions="You are an editor. Quote the documents exactly.")

    async def run():
        a = await agents.Runner.run(analyst, "How many inhabitants does Springfield have?")
        b = await agents.Runner.run(editor, "When was the town hall built?")
        return a, b

    a, b = asyncio.run(asyncio.wait_for(run(), 600))
    assert "167882" in a.final_output.replace(",", "")
    assert "1796" in b.final_output
    for res in (a, b):  # both agents' prompts reused the document's chunk K/V
        details = res.context_wrapper.usage.input_tokens_details
        assert details.cached_tokens > 0, details


def test_agents_with_other_instructions_share_the_conversation(qwen_url):
    """A planner and a reviewer with different instructions: the reviewer receives the
    planner's conversation. With ``extra_body={"strategy": "cacheblend"}`` on both agents each
    message after the system prompt is cached by its own tokens, so the reviewer's request
    reuses the K/V of the messages the planner's requests computed (reported as cached input
    tokens); prefix reuse alone would stop at the differing system prompt."""
    agents.set_tracing_disabled(True)
    model = agents.OpenAIChatCompletionsModel(
        model=QWEN, openai_client=AsyncOpenAI(base_url=qwen_url + "/v1", api_key="none"))
    shared = agents.ModelSettings(temperature=0, max_tokens=40,
                                  extra_body={"strategy": "cacheblend"})
    planner = agents.Agent(name="planner", model=model, model_settings=shared,
                           instructions="You plan trips. Answer with a short day-by-day plan.")
    reviewer = agents.Agent(name="reviewer", model=model, model_settings=shared,
                            instructions="You review travel plans. Reply with one sentence.")
    brief = ("Plan two days in Kyoto for a visitor who likes temples and food. The visitor "
             "arrives by train on Saturday morning and leaves on Sunday evening.")

    async def run():
        p1 = await agents.Runner.run(planner, brief)
        p2 = await agents.Runner.run(  # the planner's second turn resends the first
            planner, p1.to_input_list() + [{"role": "user", "content": "Make it shorter."}])
        r = await agents.Runner.run(
            reviewer, p2.to_input_list() + [{"role": "user", "content": "Is it realistic?"}])
        return p1, p2, r

    p1, p2, r = asyncio.run(asyncio.wait_for(run(), 600))
    assert p1.final_output and p2.final_output and r.final_output
    cached = [x.context_wrapper.usage.input_tokens_details.cached_tokens for x in (p1, p2, r)]
    # the brief and the first plan, cached by the planner's second turn, are found under the
    # reviewer's own system prompt
    assert cached[2] > cached[0] + 20, cached
