"""Agent teams on the gateway's agents API, shaped for LangGraph (or any orchestration).

Every agent of a team reads the same shared messages under its own system prompt. The gateway
encodes each message once and reuses its K/V in every agent's prompt (KVCOMM: offsets
estimated from anchors, selective recompute), so a message read by five agents is prefilled
about once, not five times.

    team = CtxCacheTeam({"researcher": "...", "critic": "...", "writer": "..."})
    team.post("user", "Plan a three-day trip to Kyoto.")
    graph.add_node("researcher", team.node("researcher"))   # LangGraph node: state → update
"""

from __future__ import annotations

from typing import Any, Callable

from ctxcache_client import AsyncClient, Client


class CtxCacheTeam:
    def __init__(self, agents: dict[str, str], shared_context: str = "", *,
                 base_url: str | None = None, api_key: str | None = None,
                 max_tokens: int = 256, strategy: str | None = None):
        self.client = Client(base_url, api_key)
        self.aclient = AsyncClient(base_url, api_key)
        self.max_tokens = max_tokens
        self.strategy = strategy
        self.session = self.client.create_session(agents, shared_context)
        self.id = self.session["id"]
        self.last: dict | None = None  # the gateway's reply to the latest node turn

    def post(self, agent: str, content: str) -> None:
        """Add a message to the shared conversation (e.g. the user's task, a tool result)."""
        self.client.post_message(self.id, agent, content)

    def say(self, agent: str, **kw) -> dict:
        """One turn of ``agent`` over everything posted so far; its answer joins the shared
        conversation. Returns the gateway's reply (``content``, ``usage``, ``ctxcache``)."""
        return self.client.generate(self.id, agent, **self._opts(kw))

    async def asay(self, agent: str, **kw) -> dict:
        return await self.aclient.generate(self.id, agent, **self._opts(kw))

    def _opts(self, kw: dict) -> dict:
        return {"max_tokens": self.max_tokens, "strategy": self.strategy, **kw}

    def messages(self) -> list[dict]:
        return self.client.get_session(self.id)["messages"]

    def node(self, agent: str, key: str = "messages", **kw) -> Callable[[dict], dict]:
        """A LangGraph node: runs ``agent``'s turn and returns ``{key: [(agent, text)]}``
        (use a list reducer such as ``operator.add`` on that state key). The conversation
        itself lives in the gateway session, so nodes need not pass it along."""

        def run(state: dict[str, Any]) -> dict:
            out = self.say(agent, **kw)
            self.last = out
            return {key: [(agent, out["content"])]}

        async def arun(state: dict[str, Any]) -> dict:
            out = await self.asay(agent, **kw)
            self.last = out
            return {key: [(agent, out["content"])]}

        run.__name__ = f"{agent}_turn"
        try:  # LangGraph picks the async variant in async graphs when given a RunnableLambda
            from langchain_core.runnables import RunnableLambda

            return RunnableLambda(run, afunc=arun, name=agent)
        except ImportError:  # pragma: no cover - langchain-core is a dependency
            return run

    def close(self) -> None:
        self.client.delete_session(self.id)
