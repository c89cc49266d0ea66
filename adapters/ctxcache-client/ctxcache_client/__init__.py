"""Sync and async clients for the ctxcache gateway's native API."""

from ctxcache_client.client import AsyncClient, Client, CtxCacheAPIError, default_base_url

__all__ = ["AsyncClient", "Client", "CtxCacheAPIError", "default_base_url"]
