"""Cache administration (admin key): statistics, flush, per-category policies, API keys; and
the semantic cache as a key–value cache for client-side caches (tenant key)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends

from ctxcache.kv.keys import check_namespace
from ctxcache.errors import InvalidInputError
from ctxcache.semantic.types import CacheRequest, context_fingerprint
from ctxcache.service.deps import admin_dep, gw_dep, tenant_dep
from ctxcache.service.errors import ERROR_RESPONSES, APIError
from ctxcache.service.gateway import Gateway, Tenant
from ctxcache.service.schemas import (
    ClientCacheEntry, ClientCacheLookup, FlushRequest, KeyRequest,
)

router = APIRouter(responses=ERROR_RESPONSES)
CLIENT_ROUTE = "/v1/cache/entries"


def _semantic(gw: Gateway):
    if gw.semantic is None:
        raise APIError(404, "semantic cache is disabled", code="not_found")
    return gw.semantic


def _client_request(body: ClientCacheLookup, tenant: str) -> CacheRequest:
    return CacheRequest(body.prompt, tenant=tenant, category=body.category, route=CLIENT_ROUTE,
                        context_fp=context_fingerprint(system="client-scope:" + body.scope))


def _checked(fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except InvalidInputError as e:
        raise APIError(400, str(e), code="invalid_value") from None


@router.post("/v1/cache/lookup")
async def client_lookup(body: ClientCacheLookup, gw: Gateway = Depends(gw_dep),
                        t: Tenant = Depends(tenant_dep)):
    """The stored value of the closest earlier prompt in this scope, if close enough for its
    category's threshold and still within its TTL."""
    sem = _semantic(gw)
    res = await asyncio.to_thread(_checked, sem.lookup, _client_request(body, t.name))
    hit = res.hit
    return {"hit": hit is not None, "category": res.category,
            "value": hit.response.get("value") if hit else None,
            "similarity": hit.similarity if hit else None, "age_s": hit.age_s if hit else None}


@router.post(CLIENT_ROUTE)
async def client_insert(body: ClientCacheEntry, gw: Gateway = Depends(gw_dep),
                        t: Tenant = Depends(tenant_dep)):
    """Store a value for a prompt (category policy decides: quota, size, cacheable)."""
    sem = _semantic(gw)
    req = _client_request(body, t.name)
    entry_id = await asyncio.to_thread(_checked, _insert_and_compare, sem, req, body.value)
    return {"stored": entry_id is not None, "id": entry_id}


def _insert_and_compare(sem, req: CacheRequest, value) -> int | None:
    """A client stores what it generated after a miss: where that miss had a candidate just
    below a verified threshold, the value is the evidence verified thresholds learn from (the
    client cache would otherwise never get past exploring)."""
    if not sem.verified_anywhere():
        return sem.insert(req, {"value": value})
    res = sem.lookup(req)
    if res.candidate is not None:
        sem.record_outcome(res, {"value": value})
    return sem.insert(req, {"value": value}, embedding=res.embedding, category=res.category)


@router.delete(CLIENT_ROUTE)
async def client_clear(scope: str = "", gw: Gateway = Depends(gw_dep),
                       t: Tenant = Depends(tenant_dep)):
    """Drop this tenant's entries of one scope."""
    sem = _semantic(gw)
    n = await asyncio.to_thread(_checked, sem.invalidate, tenant=t.name,
                                context_fp=context_fingerprint(system="client-scope:" + scope))
    return {"removed": n}


@router.get("/v1/cache/stats")
async def cache_stats(gw: Gateway = Depends(gw_dep), t: Tenant = Depends(admin_dep)):
    out: dict = {"backend": gw.backend.name}
    if gw.semantic is not None:
        out["semantic"] = gw.semantic.stats_dict()
        out["semantic_verified"] = gw.semantic.verified_stats()
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
