"""The one interface of KV reuse strategies.

A prompt is a list of segments (``types.Segment``): a shared ``prefix``, reusable ``chunk``s and
``text`` that is always computed. A strategy turns the segments into the K/V to decode from,
plus the logits of the last prompt token and statistics (tokens reused / recomputed, FLOPs,
time per phase). The prompt's last token is always computed, so decoding never starts from a
stale logit.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

from ctxcache.fusion.chunks import all_ids, resolve
from ctxcache.fusion.types import (  # noqa: F401 - re-exported
    FusionContext, FusionResult, FusionStats, Role, Segment, Timer,
)


class FusionStrategy(ABC):
    name: str = "strategy"

    def start(self, ctx: FusionContext, segments: Sequence[Segment], **extra):
        """Common opening of ``build``: fresh stats, a phase timer, the resolved layout."""
        stats = FusionStats(self.name, extra=dict(extra))
        timer = Timer(stats, ctx.sync_phases)
        with timer("resolve"):
            pieces = resolve(ctx, segments)
        return stats, timer, pieces, all_ids(pieces)

    @abstractmethod
    def build(self, ctx: FusionContext, segments: Sequence[Segment]) -> FusionResult:
        """Assemble the prompt's K/V from ``segments``."""

    def describe(self) -> dict:
        return {"name": self.name}
