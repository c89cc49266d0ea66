"""Alembic migrations of ctxcache's SQL schema (installed as ``ctxcache.migrations``)."""
