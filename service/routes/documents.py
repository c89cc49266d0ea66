"""Documents: ingest (chunked, chunk K/V precomputed), list, inspect, delete."""

from __future__ import annotations

import asyncio
import threading

from fastapi import APIRouter, Depends, Request

from ctxcache.service.deps import gw_dep, tenant_dep
from ctxcache.service.errors import ERROR_RESPONSES, APIError
from ctxcache.service.gateway import Gateway, Tenant
from ctxcache.service.pipeline import admit
from ctxcache.service.schemas import DocumentsRequest

router = APIRouter(responses=ERROR_RESPONSES)


@router.post("/v1/documents")
async def ingest(body: DocumentsRequest, request: Request, gw: Gateway = Depends(gw_dep),
                 t: Tenant = Depends(tenant_dep)):
    """Ingest documents. Ingestion is engine work like generation: it takes a place in the same
    bounded queue (429 when full), runs in one of the same slots, and stops between chunks
    when the client goes away."""
    lim = gw.settings
    if len(body.documents) > lim.max_documents_per_request:
        raise APIError(400, f"{len(body.documents)} documents in one request; this server "
                       f"takes at most {lim.max_documents_per_request}", code="invalid_value",
                       param="documents")
    for i, d in enumerate(body.documents):
        if len(d.text) > lim.max_document_chars:
            raise APIError(400, f"document {i} has {len(d.text)} characters; this server takes "
                           f"at most {lim.max_document_chars}", code="invalid_value",
                           param=f"documents.{i}.text")
    admit(gw)
    cancel = threading.Event()

    def work():
        if not gw.gate.acquire(cancel.is_set):
            raise APIError(499, "client closed request", code="cancelled")
        try:
            return [gw.docs.ingest(t.name, d.text, d.title, d.metadata, body.public,
                                   should_stop=cancel.is_set) for d in body.documents]
        finally:
            gw.gate.release()

    async def watch():
        while not cancel.is_set():
            if await request.is_disconnected():
                cancel.set()
                return
            await asyncio.sleep(0.25)

    watcher = asyncio.create_task(watch())
    try:
        out = await asyncio.to_thread(work)
    finally:
        cancel.set()
        watcher.cancel()
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
    out = await asyncio.to_thread(gw.docs.delete, t.name, doc_id, t.admin)
    if gw.semantic is not None:  # a public document's answers may be cached by any tenant
        out["semantic_entries_removed"] = await asyncio.to_thread(
            gw.semantic.invalidate, tenant=None if out["public"] else t.name, doc_id=doc_id)
    return out
