"""Agent team sessions: several agents sharing one conversation.

Each message is a shared segment (a chunk with a content key). When an agent speaks, its prompt
is its own prefix — its system prompt + the shared context — then every message so far as
chunks, then a cue to answer. The messages' K/V is cached once (prefix-free, at append time) and
reused by every agent under its own prefix; KVCOMM (``kvcomm.py``) corrects the cross-prefix
deviation from an anchor pool, CacheBlend repairs what is left.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field

from ctxcache.errors import CtxCacheError, InvalidInputError


class UnknownSessionError(CtxCacheError, LookupError):
    """No such agent session for this tenant."""


@dataclass
class AgentSession:
    id: str
    tenant: str
    shared_context: str
    agents: dict[str, str]
    messages: list[tuple[str, str]] = field(default_factory=list)
    created_at: float = field(default_factory=time.time)

    def as_dict(self) -> dict:
        return {"id": self.id, "shared_context": self.shared_context, "agents": self.agents,
                "messages": [{"agent": a, "content": c} for a, c in self.messages],
                "created_at": self.created_at}

    def system_for(self, agent: str) -> str:
        own = self.agents.get(agent, f"You are {agent}.")
        return f"{own}\n\n{self.shared_context}".strip()


def message_text(agent: str, content: str) -> str:
    return f"{agent}: {content}"


def agent_prompt(session: "AgentSession", agent: str):
    """(system prompt, shared segments as passage texts, turn cue) of ``agent``'s next turn."""
    passages = [message_text(a, c) for a, c in session.messages] or [session.shared_context]
    return session.system_for(agent), passages, f"Reply as {agent}, in one message."


class AgentSessions:
    def __init__(self, max_sessions: int = 10_000, max_messages: int = 1_000):
        self._sessions: dict[str, AgentSession] = {}
        self._lock = threading.Lock()
        self.max_sessions = max_sessions
        self.max_messages = max_messages

    def create(self, tenant: str, shared_context: str, agents: dict[str, str]) -> AgentSession:
        for name in agents:
            if not name or len(name) > 64:
                raise InvalidInputError("agent names must be 1-64 characters")
        with self._lock:
            if len(self._sessions) >= self.max_sessions:
                oldest = min(self._sessions.values(), key=lambda s: s.created_at)
                del self._sessions[oldest.id]
            s = AgentSession(uuid.uuid4().hex, tenant, shared_context, dict(agents))
            self._sessions[s.id] = s
        return s

    def get(self, tenant: str, sid: str) -> AgentSession:
        s = self._sessions.get(sid)
        if s is None or s.tenant != tenant:
            raise UnknownSessionError(f"unknown agent session {sid!r}")
        return s

    def append(self, tenant: str, sid: str, agent: str, content: str) -> AgentSession:
        s = self.get(tenant, sid)
        with self._lock:
            if len(s.messages) >= self.max_messages:
                raise InvalidInputError(f"session already holds {self.max_messages} messages")
            s.messages.append((agent, content))
        return s

    def delete(self, tenant: str, sid: str) -> None:
        self.get(tenant, sid)
        with self._lock:
            self._sessions.pop(sid, None)
