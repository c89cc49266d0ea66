"""Cache administration (admin key): statistics, flush, per-category policies, API keys."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends

from ctxcache.kv.keys import check_namespace
from ctxcache.service.deps import admin_dep, gw_dep
from ctxcache.service.errors import APIError
from ctxcache.service.gateway import Gateway, Tenant
from ctxcache.service.schemas import FlushRequest, KeyRequest

router = APIRouter()


@router.get("/v1/cache/stats")
async def cache_stats(gw: Gateway = Depends(gw_dep), t: Tenant = Depends(admin_dep)):
    out: dict = {"backend": gw.backend.name}
    if gw.semantic is not None:
        out["semantic"] = gw.semantic.stats_dict()
    if gw.store is not None:
        out["kv"] = gw.store.stats()
    planner = getattr(gw.backend, "planner", None)
    if planner is not None:
        out["planner"] = planner.describe()
    return out


@router.post("/v1/cache/flush")
async def flush(body: FlushRequest, gw: Gateway = Depends(gw_dep),
                t: Tenant = Depends(admin_dep)):
    out: dict = {}
    if body.tenant is not None:
        check_namespace(body.tenant)
    if body.semantic and gw.semantic is not None:
        if body.tenant is None and body.category is None and body.document_id is None:
            raise APIError(400, "flush needs a tenant, category or document_id",
                           code="invalid_value")
        out["semantic_entries_removed"] = await asyncio.to_thread(
            gw.semantic.invalidate, tenant=body.tenant, category=body.category,
            doc_id=body.document_id)
    if body.kv:
        if body.tenant is None:
            raise APIError(400, "kv flush needs a tenant", code="invalid_value")
        if gw.store is not None:
            out["kv_entries_removed"] = await asyncio.to_thread(
                gw.store.delete_namespace, body.tenant)
        else:
            await asyncio.to_thread(gw.backend.flush)
            out["backend_flushed"] = True
    return out


@router.get("/v1/cache/policies")
async def get_policies(gw: Gateway = Depends(gw_dep), t: Tenant = Depends(admin_dep)):
    if gw.semantic is None:
        raise APIError(404, "semantic cache is disabled", code="not_found")
    return {c: p.model_dump() for c, p in gw.semantic.policies.items()}


@router.put("/v1/cache/policies/{category}")
async def put_policy(category: str, values: dict, gw: Gateway = Depends(gw_dep),
                     t: Tenant = Depends(admin_dep)):
    if gw.semantic is None:
        raise APIError(404, "semantic cache is disabled", code="not_found")
    return gw.semantic.set_policy(category, values).model_dump()


@router.post("/v1/admin/keys")
async def create_key(body: KeyRequest, gw: Gateway = Depends(gw_dep),
                     t: Tenant = Depends(admin_dep)):
    key = await asyncio.to_thread(gw.keys.create, body.tenant, body.name,
                                  body.rate_limit_per_min)
    return {"key": key, "tenant": body.tenant, "rate_limit_per_min": body.rate_limit_per_min}
