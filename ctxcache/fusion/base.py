"""The one interface of KV reuse strategies.

A prompt is a list of segments (``types.Segment``): a shared ``prefix``, reusable ``chunk``s and
``text`` that is always computed. A strategy turns the segments into the K/V to decode from,
plus the logits of the last prompt token and statistics (tokens reused / recomputed, FLOPs,
time per phase). The prompt's last token is always computed, so decoding never starts from a
stale logit.
"""

from __future__ import annotations

import copy

from abc import ABC, abstractmethod
from typing import Sequence

from ctxcache.errors import InvalidInputError
from ctxcache.fusion.chunks import all_ids, resolve
from ctxcache.fusion.types import (  # noqa: F401 - re-exported
    FusionContext, FusionResult, FusionStats, Role, Segment, Timer,
)


class FusionStrategy(ABC):
    name: str = "strategy"
    # every prompt row is the exact causal K/V (full prefill, prefix reuse): nothing to check
    # against full prefill, so the planner never spends a shadow build on it
    exact: bool = False

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

    # the attribute that holds this strategy's recompute ratio (None: it has none)
    ratio_attr: str | None = None

    def with_ratio(self, ratio: float) -> "FusionStrategy":
        """This strategy with another recompute ratio (a per-request override); learned state
        such as Cache-Craft's chunk table stays shared with the original."""
        if self.ratio_attr is None:
            raise InvalidInputError(f"strategy {self.name!r} has no recompute ratio")
        if not 0.0 <= float(ratio) <= 1.0:
            raise InvalidInputError("recompute_ratio must be in [0, 1]")
        out = copy.copy(self)
        setattr(out, self.ratio_attr, float(ratio))
        return out

    def describe(self) -> dict:
        return {"name": self.name}
