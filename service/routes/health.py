"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ctxcache.service.deps import gw_dep
from ctxcache.service.errors import ERROR_RESPONSES
from ctxcache.service.gateway import Gateway

router = APIRouter(responses=ERROR_RESPONSES)


@router.get("/health")
async def health(gw: Gateway = Depends(gw_dep)):
    return {"status": "ok", "backend": gw.backend.name,
            "backend_healthy": await asyncio.to_thread(gw.backend.health),
            "uptime_s": round(time.time() - gw.started, 1)}


@router.get("/ready", responses={503: {"description": "backend or database not ready"}})
async def ready(gw: Gateway = Depends(gw_dep)):
    backend = await asyncio.to_thread(gw.backend.health)
    ok = backend and gw.db_ready
    return JSONResponse({"ready": ok, "backend": backend, "database": gw.db_ready},
                        200 if ok else 503)


@router.get("/metrics", response_class=Response, responses={
    200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"}})
async def metrics(gw: Gateway = Depends(gw_dep)):
    return Response(generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)
