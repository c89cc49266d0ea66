"""The data that flows through KV reuse: segments in, K/V + statistics out.

A prompt is a list of segments:

* ``prefix`` — shared instructions at the very start (system prompt). Cached at position 0, so
  reusing it is exact.
* ``chunk`` — a reusable document (retrieved passage, agent message). Cached on its own at
  positions ``0..n`` and moved to wherever it lands in this prompt.
* ``text`` — always computed (the question, glue text).

Kept apart from the strategies (``base.py``) so the layout code (``chunks.py``) can use them
without an import cycle.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
from torch import Tensor

from ctxcache.engine.kv_pool import ResidentPrefix
from ctxcache.engine.kvcache import KVCache
from ctxcache.engine.runner import ContextGroup, Engine
from ctxcache.errors import InvalidInputError
from ctxcache.kv.store import KVStore

Role = Literal["prefix", "chunk", "text"]


@dataclass
class Segment:
    role: Role
    token_ids: list[int] | None = None
    key: str | None = None  # a chunk may be named by its cache key alone

    def __post_init__(self) -> None:
        if self.role not in ("prefix", "chunk", "text"):
            raise InvalidInputError(f"unknown segment role {self.role!r}")
        if self.token_ids is not None:
            self.token_ids = [int(t) for t in self.token_ids]
        if not self.token_ids and not self.key:
            raise InvalidInputError(f"a {self.role} segment needs token ids (or a chunk key)")
        if self.key and self.role != "chunk":
            raise InvalidInputError("only chunk segments can be named by key")

    @classmethod
    def text(cls, ids: Sequence[int]) -> "Segment":
        return cls("text", list(ids))

    @classmethod
    def chunk(cls, ids: Sequence[int] | None = None, key: str | None = None) -> "Segment":
        return cls("chunk", list(ids) if ids is not None else None, key)

    @classmethod
    def prefix(cls, ids: Sequence[int]) -> "Segment":
        return cls("prefix", list(ids))


@dataclass
class FusionStats:
    strategy: str
    prompt_tokens: int = 0
    reused_tokens: int = 0  # tokens whose K/V came from a cache at some layer
    recomputed_tokens: int = 0  # tokens run through at least the upper layers
    computed_token_layers: int = 0  # Σ over layers of tokens computed at that layer
    total_token_layers: int = 0  # prompt_tokens × layers (what full prefill computes)
    chunk_hits: int = 0
    chunk_misses: int = 0  # chunk caches built on the fly (and stored)
    hit_tokens: int | None = None  # tokens of spans found in the store (chunk strategies)
    flops: float = 0.0
    full_flops: float = 0.0
    phases: dict = field(default_factory=dict)  # seconds per phase
    extra: dict = field(default_factory=dict)

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens served from a cache, as a client's usage reports them. ``reused_tokens``
        also counts the tokens of chunks encoded on the fly for this very prompt (their K/V
        comes from a separate chunk encoding); those were not in any cache. Reused tokens of
        spans the store had are at most both counts (an upper bound: which reused rows belong to
        hits is not tracked)."""
        if self.hit_tokens is None:
            return self.reused_tokens
        return min(self.reused_tokens, self.hit_tokens)

    @property
    def compute_fraction(self) -> float:
        return self.flops / self.full_flops if self.full_flops else 1.0

    def as_dict(self) -> dict:
        return {
            "strategy": self.strategy, "prompt_tokens": self.prompt_tokens,
            "reused_tokens": self.reused_tokens, "cached_tokens": self.cached_tokens,
            "recomputed_tokens": self.recomputed_tokens,
            "computed_token_layers": self.computed_token_layers,
            "total_token_layers": self.total_token_layers, "chunk_hits": self.chunk_hits,
            "chunk_misses": self.chunk_misses, "flops": self.flops, "full_flops": self.full_flops,
            "compute_fraction": self.compute_fraction, "phases": self.phases, **self.extra,
        }


@dataclass
class FusionResult:
    kv: KVCache  # K/V of the whole prompt, positions as placed
    logits: Tensor  # [vocab] logits of the last prompt token
    stats: FusionStats
    context_group: ContextGroup | None = None  # APE's attention adjustment, kept during decode
    token_ids: list[int] = field(default_factory=list)
    storage: KVCache | None = None  # buffer holding ``kv`` with room for the answer after it


@dataclass
class FusionContext:
    """What a strategy works with: the engine, the chunk store and the caller's namespace.

    ``reserve_tokens`` asks for room after the prompt in the assembled buffer, so decoding
    continues in place instead of copying the prompt's K/V; ``sync_phases`` makes each timed
    phase wait for its device work (exact per-phase times for profiling, at the cost of
    stalling the pipeline between phases); ``resident`` is the serving engine's offer of the
    prompt's leading rows already in its page pool (exact prefix reuse takes them first)."""

    engine: Engine
    store: KVStore
    namespace: str = "default"
    reserve_tokens: int = 0
    sync_phases: bool = False
    resident: ResidentPrefix | None = None  # the prompt's exact leading K/V in device pages


class Timer:
    """Wall time per phase (also marked as ``phase:<name>`` ranges for torch.profiler).

    By default a phase measures the host time spent launching its work. With ``sync`` (the
    profiling mode) each phase ends by synchronizing the compute stream, so GPU work is
    charged to the phase that launched it; side-stream KV loads keep running."""

    def __init__(self, stats: FusionStats, sync: bool = False):
        self.stats = stats
        self.sync = sync

    def __call__(self, phase: str):
        return _Phase(self.stats, phase, self.sync)


class _Phase:
    def __init__(self, stats: FusionStats, name: str, sync: bool):
        self.stats, self.name, self.sync = stats, name, sync

    def __enter__(self):
        self.rf = torch.profiler.record_function("phase:" + self.name)  # visible in profiles
        self.rf.__enter__()
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.rf.__exit__(*exc)
        if self.sync and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.current_stream().synchronize()
        self.stats.phases[self.name] = self.stats.phases.get(self.name, 0.0) + (
            time.perf_counter() - self.t0)


