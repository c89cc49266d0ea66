"""A LangGraph multi-agent team whose agents share context through the gateway's agents API:
each message is encoded once and its KV reused by every agent (KVCOMM).

    ctxcache serve &
    pip install -e adapters/ctxcache-client -e 'adapters/langchain-ctxcache[langgraph]'
    python examples/langgraph_team.py
"""

import operator
from typing import Annotated, TypedDict

from langgraph.graph import END, START, StateGraph

from langchain_ctxcache import CtxCacheTeam


class State(TypedDict):
    messages: Annotated[list, operator.add]


team = CtxCacheTeam({
    "planner": "You are the planner. Propose a concrete plan in two sentences.",
    "budget": "You are the budget officer. Comment on costs in one sentence.",
    "critic": "You are the critic. Point out one risk in one sentence."},
    shared_context="The team plans a three-day trip to Japan in spring.", max_tokens=48)
team.post("user", "We land in Tokyo on Friday morning and leave from Osaka on Sunday night.")

graph = StateGraph(State)
for name in ("planner", "budget", "critic"):
    graph.add_node(name, team.node(name))
graph.add_edge(START, "planner")
graph.add_edge("planner", "budget")
graph.add_edge("budget", "critic")
graph.add_edge("critic", END)
result = graph.compile().invoke({"messages": []})
for agent, text in result["messages"]:
    print(f"[{agent}] {text.strip()}")
meta = team.last["ctxcache"]
print(f"last turn: {meta['strategy']}, reused {meta['reused_tokens']} prompt tokens, "
      f"recomputed {meta['recomputed_tokens']}")
team.close()
