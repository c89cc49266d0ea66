"""Prometheus metrics of one gateway instance (own registry, so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("ctxcache_requests_total", "Requests by route and status",
                                ["route", "status"], registry=r)
        self.semantic_hits = Counter("ctxcache_semantic_hits_total", "Semantic cache hits",
                                     ["category"], registry=r)
        self.semantic_misses = Counter("ctxcache_semantic_misses_total",
                                       "Semantic cache misses", ["category"], registry=r)
        self.reused_tokens = Counter("ctxcache_reused_tokens_total",
                                     "Prompt tokens served from KV caches", registry=r)
        self.prompt_tokens = Counter("ctxcache_prompt_tokens_total", "Prompt tokens", registry=r)
        self.completion_tokens = Counter("ctxcache_completion_tokens_total",
                                         "Generated tokens", registry=r)
        self.ttft = Histogram("ctxcache_ttft_seconds", "Time to first token",
                              ["source"], registry=r,
                              buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                       1, 2.5, 5, 10, 30))
        self.queue_depth = Gauge("ctxcache_queue_depth", "Requests waiting for the backend",
                                 registry=r)
        self.in_flight = Gauge("ctxcache_in_flight", "Generations running", registry=r)
        self.semantic_errors = Counter(
            "ctxcache_semantic_errors_total",
            "Semantic cache operations skipped because its database or index failed",
            ["op"], registry=r)
        self.rejected = Counter("ctxcache_rejected_total", "Requests refused (429/503)",
                                ["reason"], registry=r)

    def watch_engine(self, serving) -> None:
        """Scheduler gauges, read from the serving engine at scrape time."""
        r = self.registry

        def gauge(name: str, doc: str, fn) -> None:
            Gauge(name, doc, registry=r).set_function(fn)

        snap = serving.snapshot
        gauge("ctxcache_engine_running", "Sequences in the running batch",
              lambda: len(serving.running))
        gauge("ctxcache_engine_waiting", "Requests waiting for admission to the batch",
              lambda: len(serving.waiting) + len(serving._inbox))
        gauge("ctxcache_engine_swapped", "Sequences preempted to host memory",
              lambda: len(serving.swapped))
        gauge("ctxcache_engine_kv_pool_usage", "Share of K/V pool blocks in use",
              lambda: serving.pool.stats().usage)
        gauge("ctxcache_engine_kv_pool_blocks_used", "K/V pool blocks in use",
              lambda: serving.pool.stats().used)
        gauge("ctxcache_engine_kv_pool_blocks_total", "K/V pool blocks",
              lambda: serving.pool.num_blocks - 1)
        gauge("ctxcache_engine_mean_batch_size", "Mean running batch size per engine step",
              lambda: snap()["mean_batch"])
        gauge("ctxcache_engine_tokens_per_second", "Generated tokens per second (last 10 s)",
              lambda: snap()["tokens_per_s_10s"])
        gauge("ctxcache_engine_preemptions", "Sequences swapped out so far",
              lambda: serving.stats["preemptions"])
