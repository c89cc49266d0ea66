"""The HTTP gateway (FastAPI), installed as ``ctxcache.service``."""
