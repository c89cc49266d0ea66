"""Gateway configuration: environment variables (``CTXCACHE_*``), an optional config file
(``CTXCACHE_CONFIG``, JSON or YAML), then defaults that work on a fresh machine: embedded engine
with the packaged SmolLM2 on CPU, SQLite and a local-disk KV tier under the cache directory."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from ctxcache.engine.models import cache_dir


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CTXCACHE_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    backend: Literal["embedded", "sglang"] = "embedded"
    model: str = "smollm2-135m-instruct"
    device: str = "cpu"
    dtype: str = "float32"
    sglang_url: str = "http://127.0.0.1:30000"
    sglang_timeout_s: float = 120.0

    database_url: str | None = None  # default: SQLite file in the cache dir
    data_dir: Path = Field(default_factory=lambda: cache_dir() / "gateway")
    kv_gpu_bytes: int = 0
    kv_cpu_bytes: int = 2 << 30
    kv_disk_bytes: int = 20 << 30
    redis_url: str | None = None
    kv_redis_bytes: int = 8 << 30
    kv_codec: Literal["raw", "int8", "int4"] = "raw"
    kv_eviction: Literal["lru", "gdsf"] = "gdsf"
    strategy: str = "cacheblend"  # default reuse strategy, or "auto"
    recompute_ratio: float = 0.15
    # the default strategy's route for long prompts: from this many prompt tokens on, serve
    # with this strategy instead (CacheBlend loses far needles at 32K where APE keeps them;
    # README, "Long context"); "none" keeps the default at every length
    long_context_strategy: str = "ape"
    long_context_tokens: int = Field(24000, ge=0)
    # time full prefill and each strategy on this engine once (cached on disk) so that `auto`
    # and the default strategy fall back to full prefill where reuse would be slower
    cost_model: Literal["on", "off"] = "on"
    chunk_tokens: int = 256

    semantic_cache: bool = True
    semantic_verify_rate: float = Field(0.0, ge=0.0, le=1.0)
    # verified thresholds for every category without its own bound: learn each (tenant,
    # category) threshold online so that at most this share of semantic hits is wrong
    semantic_max_error_rate: float | None = Field(None, gt=0.0, lt=1.0)
    # replicas sharing one database learn each other's entries by polling it (0: never)
    semantic_sync_s: float = 2.0
    load_adaptive: bool = False

    auth: Literal["none", "required"] = "none"
    admin_key: str | None = None
    default_rate_limit_per_min: int = 600

    # generations decoding at once in one batch (the serving engine's running-sequence limit);
    # default: 16 on CPU, 64 on CUDA
    max_concurrency: int | None = Field(None, ge=1, le=1024)
    max_prefill_tokens: int = Field(8192, ge=1)  # new prompt tokens per engine step
    kv_pool_bytes: int | None = Field(None, ge=1)  # paged K/V pool of running sequences
    kv_pool_fraction: float = Field(0.4, gt=0.0, lt=1.0)  # of free GPU memory, if no bytes
    kv_block_size: int = Field(16, ge=1, le=1024)
    cuda_graphs: bool = True  # decode steps replayed as CUDA graphs per batch-size bucket
    max_queue: int = 32  # waiting requests beyond which the gateway answers 429
    # estimated wait for a slot beyond which a newcomer is refused with 429 (None: no bound);
    # estimated from measured slot hold times, so it adapts to the machine and the load
    max_queue_wait_s: float | None = Field(15.0, gt=0)
    # requests in their semantic lookup at once (before the queue); beyond it: 429 at once
    max_lookups: int = Field(32, ge=1)
    max_tokens_limit: int = 2048
    request_timeout_s: float = 300.0
    # bounded work per request: refused (413 / 400) before any parsing or tokenizing
    max_body_bytes: int = Field(8 << 20, ge=1024)
    max_messages: int = Field(1024, ge=1, le=10_000)
    max_document_chars: int = Field(1_000_000, ge=1, le=2_000_000)
    max_documents_per_request: int = Field(64, ge=1, le=256)
    # agent sessions: per tenant (oldest of that tenant evicted beyond it) and in all
    max_sessions_per_tenant: int = Field(1000, ge=1)
    max_sessions: int = Field(10_000, ge=1)

    @property
    def concurrency(self) -> int:
        if self.max_concurrency is not None:
            return self.max_concurrency
        return 64 if self.device.startswith("cuda") else 16

    @classmethod
    def load(cls, **overrides) -> "Settings":
        path = os.environ.get("CTXCACHE_CONFIG")
        values: dict = {}
        if path:
            text = Path(path).read_text()
            if path.endswith((".yaml", ".yml")):
                import yaml

                values = yaml.safe_load(text) or {}
            else:
                values = json.loads(text)
        env = cls(**overrides)  # environment variables + explicit overrides
        # explicit arguments > environment > config file > defaults
        data = dict(values)
        for k in cls.model_fields:
            if k in overrides or f"CTXCACHE_{k.upper()}" in os.environ:
                data[k] = getattr(env, k)
        return cls(**data)
