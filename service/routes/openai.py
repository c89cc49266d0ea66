"""OpenAI-compatible endpoints: models, chat completions, completions."""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Depends, Request

from ctxcache.errors import InvalidInputError
from ctxcache.semantic.cache import context_fingerprint
from ctxcache.structured import parse_tool_spec, response_schema
from ctxcache.service.backends import GenRequest, RagPrompt
from ctxcache.service.deps import check_model, gw_dep, tenant_dep
from ctxcache.service.documents import DEFAULT_RAG_SYSTEM
from ctxcache.service.errors import ERROR_RESPONSES, APIError, STREAMING_RESPONSES
from ctxcache.service.gateway import Gateway, Tenant
from ctxcache.service.pipeline import Call, sampling, serve
from ctxcache.service.routes.rag import check_strategy, document_passages
from ctxcache.service.schemas import ChatCompletionRequest, CompletionRequest

router = APIRouter(responses=ERROR_RESPONSES)


@router.get("/v1/models")
async def models(gw: Gateway = Depends(gw_dep), t: Tenant = Depends(tenant_dep)):
    caps = await asyncio.to_thread(gw.backend.capabilities)
    return {"object": "list", "data": [
        {"id": m, "object": "model", "created": int(gw.started), "owned_by": "ctxcache",
         "capabilities": caps} for m in sorted(gw.model_names)]}


@router.post("/v1/chat/completions", responses=STREAMING_RESPONSES)
async def chat(body: ChatCompletionRequest, request: Request,
               gw: Gateway = Depends(gw_dep), t: Tenant = Depends(tenant_dep)):
    check_model(gw, body.model)
    if len(body.messages) > gw.settings.max_messages:
        raise APIError(400, f"{len(body.messages)} messages; this server takes at most "
                       f"{gw.settings.max_messages}", code="invalid_value", param="messages")
    messages = [chat_message(m) for m in body.messages]
    if not any(m["content"] or m.get("tool_calls") for m in messages):
        raise APIError(400, "messages must contain some text", code="invalid_value",
                       param="messages")
    params = sampling(body.max_completion_tokens or body.max_tokens, body.temperature,
                      body.top_p, body.stop, body.seed, gw.settings.max_tokens_limit)
    tools, schema = structured_fields(body)
    if body.document_ids or body.passages:
        if tools is not None and tools.choice != "none":
            raise APIError(400, "tools cannot be combined with document_ids/passages",
                           code="invalid_value", param="tools")
        return await grounded_chat(body, messages, params, request, gw, t, schema)
    last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    history = messages[:-1] if messages[-1]["role"] == "user" else messages
    fp = context_fingerprint(documents=[json.dumps(history)], temperature=body.temperature,
                             tools=body.tools, model=body.model,
                             system=json.dumps(body.stop) + answer_format(body))
    call = Call("chat", body.model, t.name, last_user, fp, body.category,
                "/v1/chat/completions", body.cache and not body.tools)
    check_strategy(gw, body.strategy)
    req = GenRequest(params, t.name, messages=messages, tools=tools, schema=schema,
                     strategy=body.strategy)
    return await serve(gw, request, req, call, stream=body.stream)


def answer_format(body: ChatCompletionRequest) -> str:
    """The response format as part of the semantic cache's context: a JSON answer is never
    served for a text request, nor one schema's answer for another."""
    rf = body.response_format
    return "" if not rf or rf.get("type") == "text" else "|format|" + json.dumps(rf,
                                                                                sort_keys=True)


def chat_message(m) -> dict:
    """One OpenAI message as the engine takes it (``developer`` is a system turn)."""
    out = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
    if m.tool_calls:
        if m.role != "assistant":
            raise APIError(400, "only assistant messages carry tool_calls",
                           code="invalid_value", param="messages")
        out["tool_calls"] = m.tool_calls
    if m.role == "tool" and m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    if m.name and m.role == "tool":
        out["name"] = m.name
    return out


def structured_fields(body: ChatCompletionRequest):
    """``tools`` / ``tool_choice`` / ``parallel_tool_calls`` and ``response_format``, validated
    (a 400 naming the field otherwise)."""
    try:
        tools = parse_tool_spec(body.tools, body.tool_choice, body.parallel_tool_calls)
    except InvalidInputError as e:
        raise APIError(400, str(e), code="invalid_value", param="tools") from None
    try:
        schema = response_schema(body.response_format)
    except InvalidInputError as e:
        raise APIError(400, str(e), code="invalid_value", param="response_format") from None
    return tools, schema


async def grounded_chat(body: ChatCompletionRequest, messages: list[dict], params,
                        request: Request, gw: Gateway, t: Tenant, schema=None):
    """A chat turn answered from documents/passages, laid out like /v1/rag so their chunk K/V
    is reused: system messages → system prompt, passages → chunks, the conversation → the
    question. Earlier turns are rendered as text before the last message (approximation: the
    model sees them inside one user turn, not as separate chat turns)."""
    check_strategy(gw, body.strategy)
    passages = await document_passages(gw, t.name, body.document_ids, body.passages)
    system = "\n".join(m["content"] for m in messages if m["role"] == "system" and m["content"])
    turns = [m for m in messages if m["role"] != "system" and m["content"]]
    if not turns:
        raise APIError(400, "messages need a user turn besides the system prompt",
                       code="invalid_value", param="messages")
    question = turns[-1]["content"]
    if len(turns) > 1:
        question = "\n".join(f"{m['role']}: {m['content']}" for m in turns[:-1]) + \
            f"\n{turns[-1]['role']}: {question}"
    system = system or DEFAULT_RAG_SYSTEM
    fp = context_fingerprint(documents=sorted(body.document_ids) + body.passages
                             + [json.dumps(turns[:-1])], temperature=body.temperature,
                             system=system + json.dumps(body.stop) + answer_format(body),
                             model=body.model)
    call = Call("chat", body.model, t.name, turns[-1]["content"], fp, body.category,
                "/v1/chat/completions", body.cache, body.document_ids,
                {"passages": len(passages)})
    req = GenRequest(params, t.name, rag=RagPrompt(system, passages, question),
                     strategy=body.strategy, schema=schema)
    return await serve(gw, request, req, call, stream=body.stream)


@router.post("/v1/completions", responses=STREAMING_RESPONSES)
async def completions(body: CompletionRequest, request: Request,
                      gw: Gateway = Depends(gw_dep), t: Tenant = Depends(tenant_dep)):
    check_model(gw, body.model)
    params = sampling(body.max_tokens or 16, body.temperature, body.top_p, body.stop,
                      body.seed, gw.settings.max_tokens_limit)
    fp = context_fingerprint(temperature=body.temperature, model=body.model,
                             system=json.dumps(body.stop) + f"|raw|{params.max_tokens}")
    call = Call("completion", body.model, t.name, body.prompt, fp, body.category,
                "/v1/completions", body.cache)
    return await serve(gw, request, GenRequest(params, t.name, text=body.prompt), call,
                       stream=body.stream)
