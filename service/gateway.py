"""What one gateway process holds: settings, backend, caches, keys, limits, admission gate."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from ctxcache.agents.session import AgentSessions
from ctxcache.service.auth import KeyStore, RateLimiter
from ctxcache.service.backends import Backend
from ctxcache.service.documents import DocumentService
from ctxcache.service.metrics import Metrics
from ctxcache.service.settings import Settings

log = logging.getLogger("ctxcache.gateway")


class QueueFull(Exception):
    """No place in the queue; ``args[0]`` is the suggested Retry-After in seconds."""

    @property
    def retry_after(self) -> int:
        return int(self.args[0]) if self.args else 1


class Gate:
    """Bounded admission: ``max_concurrency`` generations run, the rest wait, more → 429.

    Two bounds on the wait. ``max_queue`` caps how many requests wait; ``max_queue_wait_s`` caps
    how long a newcomer would wait for a slot, estimated from the measured service time of
    recent requests (an EWMA of slot hold times, which grows with batch size under load):
    ``(waiting + 1) × service_time / max_concurrency`` when every slot is taken. Why both: on a
    slow machine 32 queued requests can mean a minute's wait, and a client is better served by a
    429 with a Retry-After it can act on than by a request that hangs. The estimate is an
    approximation (it assumes slots free evenly spaced); it is only used to refuse early.
    """

    EWMA = 0.2  # weight of the newest slot hold time in the service-time estimate

    def __init__(self, max_concurrency: int, max_queue: int, metrics: Metrics,
                 max_lookups: int = 32, max_queue_wait_s: float | None = None):
        self.sem = threading.BoundedSemaphore(max_concurrency)
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.max_lookups = max_lookups
        self.max_queue_wait_s = max_queue_wait_s
        self.looking = 0
        self.waiting = 0
        self.running = 0
        self.service_s: float | None = None  # EWMA of how long a request holds a slot
        self._held: dict[int, float] = {}
        self.lock = threading.Lock()
        self.metrics = metrics

    def expected_wait_s(self) -> float:
        """Estimated seconds a request arriving now waits for a slot (0 while one is free)."""
        if self.running + self.waiting < self.max_concurrency or self.service_s is None:
            return 0.0
        return (self.waiting + 1) * self.service_s / self.max_concurrency

    def enter(self) -> None:
        with self.lock:
            if self.waiting >= self.max_queue:
                raise QueueFull(self._retry_after())
            wait = self.expected_wait_s()
            if self.max_queue_wait_s is not None and wait > self.max_queue_wait_s:
                raise QueueFull(self._retry_after())
            self.waiting += 1
            self.metrics.queue_depth.set(self.waiting)

    def _retry_after(self) -> int:
        """Whole seconds until a slot is likely to free (at least 1)."""
        if self.service_s is None:
            return 1
        return max(1, int(self.service_s / self.max_concurrency + 0.999))

    def enter_lookup(self) -> None:
        """A place among the requests being looked up in the semantic cache (the stage before
        the generation queue): bounded too, so a burst is refused at once, before any
        embedding, while hits keep being served when only the generation queue is full."""
        with self.lock:
            if self.looking >= self.max_lookups:
                raise QueueFull(1)
            self.looking += 1

    def leave_lookup(self) -> None:
        with self.lock:
            self.looking -= 1

    def acquire(self, cancelled: Callable[[], bool]) -> bool:
        """Block until a slot frees (in a worker thread); False if cancelled meanwhile."""
        try:
            while not self.sem.acquire(timeout=0.1):
                if cancelled():
                    return False
            with self.lock:
                self.running += 1
                self._held[threading.get_ident()] = time.monotonic()
                self.metrics.in_flight.set(self.running)
            return True
        finally:
            with self.lock:
                self.waiting -= 1
                self.metrics.queue_depth.set(self.waiting)

    def release(self) -> None:
        with self.lock:
            self.running -= 1
            t0 = self._held.pop(threading.get_ident(), None)
            if t0 is not None:
                held = time.monotonic() - t0
                self.service_s = held if self.service_s is None else (
                    (1 - self.EWMA) * self.service_s + self.EWMA * held)
            self.metrics.in_flight.set(self.running)
        self.sem.release()


@dataclass
class Tenant:
    name: str
    limit_per_min: int
    admin: bool = False


class Gateway:
    """Everything one gateway process holds; built once at start-up."""

    def __init__(self, settings: Settings, backend: Backend | None = None,
                 semantic=None, store=None):
        from ctxcache.db import make_engine

        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = Metrics()
        self.db = make_engine(settings.database_url)
        self.store = store
        self.backend = backend or self._make_backend()
        self.semantic = semantic
        self.db_ready = False
        self._closed = threading.Event()
        self._semantic_given = semantic is not None
        if not self._connect_db():
            # start degraded instead of exiting (a supervisor would restart-loop us): /ready
            # says false, requests that need the database get 503, generation works uncached
            threading.Thread(target=self._retry_db, name="db-retry", daemon=True).start()
        self.keys = KeyStore(self.db)
        self.rate = RateLimiter()
        self.gate = Gate(settings.concurrency, settings.max_queue, self.metrics,
                         settings.max_lookups, settings.max_queue_wait_s)
        serving = getattr(self.backend, "serving", None)
        if serving is not None:
            self.metrics.watch_engine(serving)
        self.docs = DocumentService(self.db, self.backend, self.store, settings.chunk_tokens)
        self.sessions = AgentSessions(settings.max_sessions,
                                      max_per_tenant=settings.max_sessions_per_tenant)
        self.model_names = {settings.model, "default"}
        self.started = time.time()

    DB_RETRY_S = 5.0

    def _connect_db(self) -> bool:
        """Migrate the database and open the semantic cache; False (logged) while it is down."""
        from ctxcache.db import migrate
        from ctxcache.service.errors import _database_down

        try:
            migrate(self.db)
            if not self._semantic_given:
                self.semantic = self._make_semantic()
        except Exception as e:  # noqa: BLE001 - only a connection failure is waited out
            if not _database_down(e):
                raise
            log.warning("database unreachable (%s); starting degraded, retrying every %.0f s",
                        type(e).__name__, self.DB_RETRY_S)
            return False
        self.db_ready = True
        return True

    def _retry_db(self) -> None:
        while not self._closed.wait(self.DB_RETRY_S):
            if self._connect_db():
                log.info("database reachable again: gateway ready")
                return

    def _make_backend(self) -> Backend:
        s = self.settings
        if s.backend == "sglang":
            from ctxcache.service.backends import SGLangBackend

            return SGLangBackend(s.sglang_url, s.sglang_timeout_s, s.model)
        from ctxcache.engine import Engine
        from ctxcache.fusion.planner import serving_planner
        from ctxcache.kv.config import build_store
        from ctxcache.service.backends import EmbeddedBackend

        engine = Engine.load(s.model, device=s.device, dtype=s.dtype)
        if self.store is None:
            self.store = build_store(s, device=s.device)
        route = None if s.long_context_strategy == "none" else (s.long_context_tokens,
                                                                s.long_context_strategy)
        planner = serving_planner(engine, s.strategy, s.recompute_ratio,
                                  cost_model=s.cost_model == "on", background=True,
                                  long_context=route)
        return EmbeddedBackend(engine, self.store, planner, max_running=s.concurrency,
                               max_prefill_tokens=s.max_prefill_tokens, kv_bytes=s.kv_pool_bytes,
                               kv_fraction=s.kv_pool_fraction, block_size=s.kv_block_size,
                               cuda_graphs=s.cuda_graphs)

    def _make_semantic(self):
        if not self.settings.semantic_cache:
            return None
        from ctxcache.semantic import LoadAdapter, SemanticCache, TransformerEmbedder

        sem = SemanticCache(TransformerEmbedder(), db_url=self.settings.database_url,
                            index_dir=self.settings.data_dir / "hnsw",
                            load_adapter=LoadAdapter(enabled=self.settings.load_adaptive),
                            verify_rate=self.settings.semantic_verify_rate)
        if self.settings.semantic_max_error_rate is not None:
            for c, pol in sem.policies.items():
                if pol.max_error_rate is None and pol.cacheable:
                    sem.set_policy(c, {"max_error_rate": self.settings.semantic_max_error_rate})
        sem.start_sync(self.settings.semantic_sync_s)
        return sem

    def close(self) -> None:
        self._closed.set()
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()
        if self.semantic is not None:
            self.semantic.close()
        if self.store is not None:
            self.store.close()
