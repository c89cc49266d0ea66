"""Per-category caching policy, and load-adaptive relaxation.

Code questions are dense (many users ask the same thing) and their answers stay valid for long:
a lower similarity bar and a long TTL pay off. Conversation turns are sparse and context-bound:
a high bar and a short TTL. Creative requests want variety and are not cached by default.

Under load the adapter relaxes thresholds (towards ``min_threshold``) and extends TTLs (towards
``max_ttl_s``) in proportion to the load signal, and tightens again as load drops: serving a
slightly less exact hit beats queueing behind an overloaded backend.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ctxcache.errors import InvalidInputError


class CategoryPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    threshold: float = Field(0.9, gt=0.0, le=1.0, description="min cosine similarity for a hit")
    ttl_s: float = Field(3600.0, gt=0.0)
    max_entries: int = Field(10_000, ge=1, description="per tenant")
    max_bytes: int = Field(64 << 20, ge=1, description="response bytes per tenant")
    cacheable: bool = True
    min_threshold: float | None = Field(None, gt=0.0, le=1.0, description="most relaxed (load)")
    max_ttl_s: float | None = Field(None, gt=0.0, description="longest TTL (load)")
    max_error_rate: float | None = Field(
        None, gt=0.0, lt=1.0, description="verified thresholds: learn the threshold online so "
        "that at most this share of hits is wrong (None: the static threshold)")

    @model_validator(mode="after")
    def _bounds(self):
        if self.min_threshold is not None and self.min_threshold > self.threshold:
            raise ValueError("min_threshold must be <= threshold")
        if self.max_ttl_s is not None and self.max_ttl_s < self.ttl_s:
            raise ValueError("max_ttl_s must be >= ttl_s")
        return self


DEFAULT_POLICIES: dict[str, dict] = {
    "code": dict(threshold=0.86, ttl_s=7 * 86400, max_entries=50_000, min_threshold=0.82,
                 max_ttl_s=30 * 86400),
    "factual": dict(threshold=0.90, ttl_s=86400, max_entries=50_000, min_threshold=0.86,
                    max_ttl_s=7 * 86400),
    "math": dict(threshold=0.97, ttl_s=30 * 86400, max_entries=20_000, min_threshold=0.95,
                 max_ttl_s=90 * 86400),
    "conversation": dict(threshold=0.95, ttl_s=600, max_entries=5_000, min_threshold=0.93,
                         max_ttl_s=3600),
    "creative": dict(threshold=0.98, ttl_s=300, max_entries=1_000, cacheable=False),
    "other": dict(threshold=0.92, ttl_s=3600, max_entries=10_000, min_threshold=0.89,
                  max_ttl_s=86400),
}


def make_policy(values: dict) -> CategoryPolicy:
    try:
        return CategoryPolicy(**values)
    except ValidationError as e:
        msg = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'policy'}: {err['msg']}"
                        for err in e.errors())
        raise InvalidInputError(f"invalid policy: {msg}") from None


def default_policies() -> dict[str, CategoryPolicy]:
    return {k: make_policy(v) for k, v in DEFAULT_POLICIES.items()}


class LoadAdapter:
    """Maps a load signal in [0, 1] (0 idle, 1 saturated) to effective threshold and TTL."""

    def __init__(self, enabled: bool = False, smoothing: float = 0.3):
        self.enabled = enabled
        self.smoothing = smoothing
        self.load = 0.0

    def observe(self, queue_depth: int, capacity: int, latency_s: float | None = None,
                latency_slo_s: float | None = None) -> float:
        """Feed backend signals; keeps an exponential moving average of the load."""
        sig = min(1.0, queue_depth / max(capacity, 1))
        if latency_s is not None and latency_slo_s:
            sig = max(sig, min(1.0, latency_s / latency_slo_s - 1.0))
        self.load = (1 - self.smoothing) * self.load + self.smoothing * max(0.0, sig)
        return self.load

    def set_load(self, load: float) -> None:
        if not 0.0 <= load <= 1.0:
            raise InvalidInputError("load must be in [0, 1]")
        self.load = load

    def threshold(self, p: CategoryPolicy) -> float:
        if not self.enabled or p.min_threshold is None:
            return p.threshold
        return p.threshold - (p.threshold - p.min_threshold) * self.load

    def ttl(self, p: CategoryPolicy) -> float:
        if not self.enabled or p.max_ttl_s is None:
            return p.ttl_s
        return p.ttl_s + (p.max_ttl_s - p.ttl_s) * self.load
