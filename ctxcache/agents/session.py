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


class SessionCapacityError(CtxCacheError):
    """Every session slot is taken by other tenants (no tenant's sessions are evicted for
    another's)."""


class AgentSessions:
    """Sessions in memory, bounded per tenant and in all.

    Eviction never crosses tenants: a tenant past its own quota loses its own oldest session;
    when the whole store is full, a tenant with sessions replaces its own oldest one and a
    tenant without any is refused, so no tenant can push out another's work."""

    def __init__(self, max_sessions: int = 10_000, max_messages: int = 1_000,
                 max_per_tenant: int = 1_000):
        self._sessions: dict[str, AgentSession] = {}
        self._by_tenant: dict[str, dict[str, AgentSession]] = {}
        self._lock = threading.Lock()
        self.max_sessions = max_sessions
        self.max_messages = max_messages
        self.max_per_tenant = max_per_tenant

    def create(self, tenant: str, shared_context: str, agents: dict[str, str]) -> AgentSession:
        for name in agents:
            if not name or len(name) > 64:
                raise InvalidInputError("agent names must be 1-64 characters")
        with self._lock:
            own = self._by_tenant.setdefault(tenant, {})
            if len(own) >= self.max_per_tenant or \
                    (len(self._sessions) >= self.max_sessions and own):
                oldest = next(iter(own.values()))  # insertion order: the oldest first
                self._drop(oldest)
            elif len(self._sessions) >= self.max_sessions:
                raise SessionCapacityError(
                    f"all {self.max_sessions} agent sessions are in use; retry later")
            s = AgentSession(uuid.uuid4().hex, tenant, shared_context, dict(agents))
            self._sessions[s.id] = s
            own[s.id] = s
        return s

    def _drop(self, s: AgentSession) -> None:
        self._sessions.pop(s.id, None)
        own = self._by_tenant.get(s.tenant)
        if own is not None:
            own.pop(s.id, None)
            if not own:
                del self._by_tenant[s.tenant]

    def count(self, tenant: str | None = None) -> int:
        with self._lock:
            return len(self._sessions) if tenant is None else \
                len(self._by_tenant.get(tenant, {}))

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
        s = self.get(tenant, sid)
        with self._lock:
            self._drop(s)
