"""FastAPI dependencies: the gateway, the calling tenant (auth + rate limit), admin rights."""

from __future__ import annotations

import hmac

from fastapi import Depends, Request

from ctxcache.service.errors import APIError
from ctxcache.service.gateway import Gateway, Tenant


def gw_dep(request: Request) -> Gateway:
    return request.app.state.gw


def tenant_dep(request: Request, gw: Gateway = Depends(gw_dep)) -> Tenant:
    auth = request.headers.get("authorization", "")
    key = auth[7:].strip() if auth.lower().startswith("bearer ") else None
    admin_key = gw.settings.admin_key
    # constant-time: the comparison must not reveal how much of a guessed key is right
    if key and admin_key and hmac.compare_digest(key.encode(), admin_key.encode()):
        t = Tenant("admin", 10**9, admin=True)
    elif key and (found := gw.keys.resolve(key)):
        t = Tenant(found[0], found[1])
    elif gw.settings.auth == "none":
        t = Tenant("default", gw.settings.default_rate_limit_per_min, admin=admin_key is None)
    else:
        raise APIError(401, "missing or invalid API key (Authorization: Bearer <key>)",
                       "authentication_error", "invalid_api_key")
    ok, wait = gw.rate.allow(t.name, t.limit_per_min)
    if not ok:
        gw.metrics.rejected.labels("rate_limit").inc()
        raise APIError(429, f"rate limit of {t.limit_per_min} requests/min exceeded",
                       "rate_limit_error", "rate_limit_exceeded",
                       headers={"Retry-After": str(max(1, int(wait + 0.999)))})
    return t


def admin_dep(t: Tenant = Depends(tenant_dep)) -> Tenant:
    if not t.admin:
        raise APIError(403, "admin key required", "permission_error", "forbidden")
    return t


def check_model(gw: Gateway, model: str) -> None:
    if model not in gw.model_names:
        raise APIError(404, f"model {model!r} not found; available: {sorted(gw.model_names)}",
                       "invalid_request_error", "model_not_found", "model")
