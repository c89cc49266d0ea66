"""What flows in and out of the semantic cache: requests, hits, lookup results, statistics."""

from __future__ import annotations

import hashlib
import json
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

MAX_TEXT_CHARS = 32_000


def context_fingerprint(*, documents: Sequence[str] = (), agent_id: str | None = None,
                        temperature: float = 0.0, tools: object = None, model: str = "",
                        system: str | None = None) -> str:
    """Hash of everything besides the question that changes the answer.

    Requests with different fingerprints never share an entry: same question over other
    documents, for another agent, with sampling, or with tools is a different request.
    """
    payload = json.dumps({"docs": list(documents), "agent": agent_id,
                          "temperature": round(float(temperature), 4), "tools": tools,
                          "model": model, "system": system}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


@dataclass
class CacheRequest:
    text: str
    tenant: str = "default"
    category: str | None = None
    route: str | None = None
    context_fp: str = ""
    model: str = ""
    doc_ids: Sequence[str] = ()


@dataclass
class CacheHit:
    entry_id: int
    response: dict
    similarity: float
    category: str
    age_s: float
    prompt: str


@dataclass
class LookupResult:
    hit: CacheHit | None
    category: str
    embedding: np.ndarray
    threshold: float
    cacheable: bool
    latency_s: float  # index + SQL time (embedding excluded)
    embed_s: float
    # verified thresholds: the best entry just below the threshold (entry id, similarity), to be
    # compared with the fresh answer once it is generated (``SemanticCache.record_outcome``)
    candidate: tuple[int, float] | None = None
    tenant: str = "default"


@dataclass
class CategoryStats:
    lookups: int = 0
    hits: int = 0
    inserts: int = 0
    evictions: int = 0
    expired: int = 0
    skipped: int = 0  # not cacheable / errored / truncated responses
    uncovered_language: int = 0  # lookups served uncached: a language the embedder lacks
    verified: int = 0
    false_hits: int = 0
    key_refused: int = 0  # candidates above threshold refused for differing hard keys
    latencies: deque = field(default_factory=lambda: deque(maxlen=2000))

    def as_dict(self) -> dict:
        lat = sorted(self.latencies)
        pct = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1e3 if lat else None)
        return {"lookups": self.lookups, "hits": self.hits,
                "hit_rate": self.hits / self.lookups if self.lookups else 0.0,
                "inserts": self.inserts, "evictions": self.evictions, "expired": self.expired,
                "skipped": self.skipped, "uncovered_language": self.uncovered_language,
                "verified": self.verified, "false_hits": self.false_hits,
                "key_refused": self.key_refused,
                "false_hit_rate_estimate": self.false_hits / self.verified if self.verified else None,
                "latency_ms_p50": pct(0.5), "latency_ms_p99": pct(0.99)}


@dataclass
class _Meta:
    fp: str
    created_at: float
    nbytes: int
    category: str = "other"
