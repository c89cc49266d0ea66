"""Agent team sessions: shared context, messages cached once for every agent, generation."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request

from ctxcache.agents import team
from ctxcache.agents.session import agent_prompt
from ctxcache.service.backends import GenRequest, RagPrompt
from ctxcache.service.deps import gw_dep, tenant_dep
from ctxcache.service.errors import ERROR_RESPONSES, APIError, STREAMING_RESPONSES
from ctxcache.service.gateway import Gateway, Tenant
from ctxcache.service.pipeline import Call, sampling, serve
from ctxcache.service.routes.rag import check_strategy
from ctxcache.service.schemas import AgentGenerate, AgentMessage, AgentSessionRequest

router = APIRouter(responses=ERROR_RESPONSES)


@router.post("/v1/agents/sessions")
async def new_session(body: AgentSessionRequest, gw: Gateway = Depends(gw_dep),
                      t: Tenant = Depends(tenant_dep)):
    return gw.sessions.create(t.name, body.shared_context, body.agents).as_dict()


@router.get("/v1/agents/sessions/{sid}")
async def get_session(sid: str, gw: Gateway = Depends(gw_dep),
                      t: Tenant = Depends(tenant_dep)):
    return gw.sessions.get(t.name, sid).as_dict()


@router.delete("/v1/agents/sessions/{sid}")
async def delete_session(sid: str, gw: Gateway = Depends(gw_dep),
                         t: Tenant = Depends(tenant_dep)):
    gw.sessions.delete(t.name, sid)
    return {"id": sid, "deleted": True}


def cache_message(gw: Gateway, tenant: str, agent: str, content: str) -> None:
    """Encode a message once (prefix-free) so every agent can reuse its K/V."""
    engine = getattr(gw.backend, "engine", None)
    if engine is not None and gw.store is not None:
        team.cache_message(engine, gw.store, tenant, agent, content)


@router.post("/v1/agents/sessions/{sid}/messages")
async def add_message(sid: str, body: AgentMessage, gw: Gateway = Depends(gw_dep),
                      t: Tenant = Depends(tenant_dep)):
    s = gw.sessions.append(t.name, sid, body.agent, body.content)
    await asyncio.to_thread(cache_message, gw, t.name, body.agent, body.content)
    return {"id": sid, "messages": len(s.messages)}


@router.post("/v1/agents/sessions/{sid}/generate", responses=STREAMING_RESPONSES)
async def agent_generate(sid: str, body: AgentGenerate, request: Request,
                         gw: Gateway = Depends(gw_dep), t: Tenant = Depends(tenant_dep)):
    s = gw.sessions.get(t.name, sid)
    if not s.messages and not s.shared_context:
        raise APIError(400, "the session has no context yet", code="invalid_value")
    check_strategy(gw, body.strategy)
    params = sampling(body.max_tokens, body.temperature, 1.0, [], None,
                      gw.settings.max_tokens_limit)
    system, passages, cue = agent_prompt(s, body.agent)
    # agents share messages under different prefixes: KVCOMM unless asked otherwise
    req = GenRequest(params, t.name, rag=RagPrompt(system, passages, cue),
                     strategy=body.strategy or "kvcomm")

    def append(text: str, finish: str) -> None:
        if body.append and text.strip():
            gw.sessions.append(t.name, sid, body.agent, text.strip())
            cache_message(gw, t.name, body.agent, text.strip())

    call = Call("agent", gw.settings.model, t.name, cache=False,
                extra={"session": sid, "agent": body.agent}, on_done=append)
    return await serve(gw, request, req, call, stream=False)
