"""Python API of an agent team on the embedded engine (the /v1/agents endpoints do the same).

    team = Team(engine, agents={"planner": "You plan.", "critic": "You find flaws."})
    team.say("user", "We must cut cloud costs by 20 % this quarter.")
    reply = team.generate("planner")          # KVCOMM reuses the shared messages' K/V
    print(reply.text, reply.stats["shared_reuse_rate"])

Each message is encoded once, without any prefix, when it is said; every agent's turn reuses it
under that agent's own prefix, with KVCOMM's anchor-based correction by default.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from ctxcache.agents.session import AgentSession, agent_prompt, message_text
from ctxcache.engine.generate import stream_from_kv
from ctxcache.engine.runner import Engine
from ctxcache.engine.sampling import SamplingParams
from ctxcache.fusion import FusionContext, FusionStrategy, make_strategy
from ctxcache.fusion.chunks import chunk_kv
from ctxcache.fusion.prompts import rag_segments
from ctxcache.fusion.types import FusionStats
from ctxcache.kv.store import KVStore
from ctxcache.kv.tiers.memory import MemoryTier


def cache_message(engine: Engine, store: KVStore, tenant: str, agent: str, content: str) -> None:
    """Encode a message once (prefix-free) so every agent can reuse its K/V."""
    ids = engine.encode(message_text(agent, content).rstrip() + "\n\n")
    chunk_kv(FusionContext(engine, store, tenant), ids, FusionStats("agent"))


@dataclass
class TeamReply:
    agent: str
    text: str
    finish_reason: str
    stats: dict


class Team:
    def __init__(self, engine: Engine, agents: dict[str, str], shared_context: str = "",
                 store: KVStore | None = None, strategy: str | FusionStrategy = "kvcomm",
                 tenant: str = "default"):
        self.engine = engine
        self.store = store or KVStore([MemoryTier(2 << 30, str(engine.device))])
        self.session = AgentSession(uuid.uuid4().hex, tenant, shared_context, dict(agents))
        self.strategy = make_strategy(strategy) if isinstance(strategy, str) else strategy
        self.tenant = tenant

    def say(self, agent: str, content: str) -> None:
        self.session.messages.append((agent, content))
        cache_message(self.engine, self.store, self.tenant, agent, content)

    def generate(self, agent: str, max_tokens: int = 128, append: bool = True,
                 temperature: float = 0.0) -> TeamReply:
        system, passages, cue = agent_prompt(self.session, agent)
        ctx = FusionContext(self.engine, self.store, self.tenant, reserve_tokens=max_tokens)
        res = self.strategy.build(ctx, rag_segments(self.engine, system, passages, cue))
        parts, finish = [], "length"
        for c in stream_from_kv(self.engine, res.kv, res.logits,
                                SamplingParams(max_tokens=max_tokens, temperature=temperature),
                                context_group=res.context_group, storage=res.storage):
            parts.append(c.text)
            finish = c.finish_reason or finish
        text = "".join(parts).strip()
        if append and text:
            self.say(agent, text)
        return TeamReply(agent, text, finish, res.stats.as_dict())
