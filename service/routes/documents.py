"""Documents: ingest (chunked, chunk K/V precomputed), list, inspect, delete."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends

from ctxcache.service.deps import gw_dep, tenant_dep
from ctxcache.service.errors import ERROR_RESPONSES
from ctxcache.service.gateway import Gateway, Tenant
from ctxcache.service.schemas import DocumentsRequest

router = APIRouter(responses=ERROR_RESPONSES)


@router.post("/v1/documents")
async def ingest(body: DocumentsRequest, gw: Gateway = Depends(gw_dep),
                 t: Tenant = Depends(tenant_dep)):
    out = []
    for d in body.documents:
        out.append(await asyncio.to_thread(gw.docs.ingest, t.name, d.text, d.title,
                                           d.metadata, body.public))
    return {"object": "list", "data": out}


@router.get("/v1/documents")
async def list_docs(gw: Gateway = Depends(gw_dep), t: Tenant = Depends(tenant_dep)):
    return {"object": "list", "data": await asyncio.to_thread(gw.docs.list, t.name)}


@router.get("/v1/documents/{doc_id}")
async def get_doc(doc_id: str, gw: Gateway = Depends(gw_dep),
                  t: Tenant = Depends(tenant_dep)):
    return await asyncio.to_thread(gw.docs.get, t.name, doc_id)


@router.delete("/v1/documents/{doc_id}")
async def delete_doc(doc_id: str, gw: Gateway = Depends(gw_dep),
                     t: Tenant = Depends(tenant_dep)):
    out = await asyncio.to_thread(gw.docs.delete, t.name, doc_id)
    if gw.semantic is not None:
        out["semantic_entries_removed"] = await asyncio.to_thread(
            gw.semantic.invalidate, tenant=t.name, doc_id=doc_id)
    return out
