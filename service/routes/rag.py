"""RAG over ingested documents and/or passages, reusing their chunk K/V."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request

from ctxcache.semantic.cache import context_fingerprint
from ctxcache.service.backends import GenRequest, RagPrompt
from ctxcache.service.deps import gw_dep, tenant_dep
from ctxcache.service.documents import DEFAULT_RAG_SYSTEM
from ctxcache.service.errors import ERROR_RESPONSES, APIError, STREAMING_RESPONSES
from ctxcache.service.gateway import Gateway, Tenant
from ctxcache.service.pipeline import Call, sampling, serve
from ctxcache.service.schemas import RagRequest

router = APIRouter(responses=ERROR_RESPONSES)


def check_strategy(gw: Gateway, strategy: str | None) -> None:
    planner = getattr(gw.backend, "planner", None)
    if strategy is not None and strategy != "auto" and planner is not None and \
            strategy not in planner.strategies:
        raise APIError(400, f"unknown strategy {strategy!r}; use one of "
                       f"{sorted(planner.strategies)} or 'auto'",
                       code="invalid_value", param="strategy")


async def document_passages(gw: Gateway, tenant: str, document_ids: list[str],
                            passages: list[str]) -> list[str]:
    """The chunks of the ingested documents (in order) followed by the given passages."""
    out = await asyncio.to_thread(gw.docs.chunks, tenant, document_ids) if document_ids else []
    out += passages
    if any(not p.strip() for p in out):
        raise APIError(400, "passages must not be empty", code="invalid_value",
                       param="passages")
    return out


@router.post("/v1/rag", responses=STREAMING_RESPONSES)
async def rag(body: RagRequest, request: Request, gw: Gateway = Depends(gw_dep),
              t: Tenant = Depends(tenant_dep)):
    if not body.document_ids and not body.passages:
        raise APIError(400, "give document_ids or passages", code="invalid_value")
    passages = await document_passages(gw, t.name, body.document_ids, body.passages)
    params = sampling(body.max_tokens, body.temperature, body.top_p, body.stop, None,
                      gw.settings.max_tokens_limit)
    check_strategy(gw, body.strategy)
    system = body.system or DEFAULT_RAG_SYSTEM
    fp = context_fingerprint(documents=sorted(body.document_ids) + body.passages,
                             temperature=body.temperature, system=system,
                             model=gw.settings.model)
    call = Call("rag", gw.settings.model, t.name, body.question, fp, None, "/v1/rag",
                body.cache, body.document_ids, {"passages": len(passages)})
    req = GenRequest(params, t.name, rag=RagPrompt(system, passages, body.question),
                     strategy=body.strategy, recompute_ratio=body.recompute_ratio)
    return await serve(gw, request, req, call, stream=body.stream)
