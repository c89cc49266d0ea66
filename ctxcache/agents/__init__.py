"""Multi-agent context sharing: team sessions, KVCOMM's anchor pool and strategy."""

from ctxcache.agents.session import (
    AgentSession, AgentSessions, UnknownSessionError, agent_prompt, message_text,
)

__all__ = ["AgentSession", "AgentSessions", "UnknownSessionError", "agent_prompt",
           "message_text"]
