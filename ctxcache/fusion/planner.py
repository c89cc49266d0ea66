"""Which strategy serves a request.

A configurable default, or ``auto``: the cheapest strategy whose measured fidelity on recent
traffic stays above a threshold, else full prefill. Fidelity is measured by *shadow checks*: on a
sampled fraction of requests the planner also runs full prefill and records how close the
strategy's first-token distribution came (top-1 agreement and KL). While a cheaper strategy has
too few samples, requests are served by full prefill and that strategy is evaluated in the
shadow, so ``auto`` never serves an unproven approximation.
"""

from __future__ import annotations

import random
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ctxcache.errors import InvalidInputError
from ctxcache.fusion.base import FusionContext, FusionResult, FusionStrategy, Segment

# cheapest first (typical compute share of full prefill)
AUTO_ORDER = ("naive", "ape", "cacheblend", "cachecraft", "prefix")


def first_token_kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """KL(full ‖ strategy) of the next-token distributions."""
    p = torch.log_softmax(ref_logits.float().reshape(-1), -1)
    q = torch.log_softmax(logits.float().reshape(-1), -1)
    return float(torch.sum(p.exp() * (p - q)))


@dataclass
class FidelityTracker:
    window: int = 50
    samples: dict[str, deque] = field(default_factory=dict)

    def record(self, strategy: str, kl: float, top1: bool) -> None:
        self.samples.setdefault(strategy, deque(maxlen=self.window)).append((kl, top1))

    def summary(self, strategy: str) -> dict:
        s = self.samples.get(strategy) or ()
        if not s:
            return {"n": 0, "top1": None, "kl": None}
        return {"n": len(s), "top1": sum(t for _, t in s) / len(s),
                "kl": sum(k for k, _ in s) / len(s)}


class Planner:
    def __init__(self, strategies: dict[str, FusionStrategy], default: str = "cacheblend",
                 min_top1: float = 0.9, min_samples: int = 10, sample_rate: float = 0.05,
                 seed: int | None = None):
        if default != "auto" and default not in strategies:
            raise InvalidInputError(f"unknown default strategy {default!r}")
        if "full" not in strategies:
            raise InvalidInputError("the planner needs the 'full' strategy as its fallback")
        self.strategies = strategies
        self.default = default
        self.min_top1 = min_top1
        self.min_samples = min_samples
        self.sample_rate = sample_rate
        self.tracker = FidelityTracker()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def _qualified(self, name: str) -> bool:
        s = self.tracker.summary(name)
        return s["n"] >= self.min_samples and s["top1"] >= self.min_top1

    def choose(self, requested: str | None = None) -> tuple[str, str | None]:
        """(strategy to serve with, strategy to evaluate in the shadow or None)."""
        name = requested or self.default
        if name != "auto":
            if name not in self.strategies:
                raise InvalidInputError(
                    f"unknown strategy {name!r}; use one of {sorted(self.strategies)} or 'auto'")
            return name, name if name != "full" and self._rng.random() < self.sample_rate else None
        cands = [n for n in AUTO_ORDER if n in self.strategies]
        for n in cands:
            if self._qualified(n):
                return n, n if self._rng.random() < self.sample_rate else None
        unproven = [n for n in cands if self.tracker.summary(n)["n"] < self.min_samples]
        return "full", (unproven[0] if unproven else None)

    def run(self, ctx: FusionContext, segments: Sequence[Segment],
            requested: str | None = None) -> FusionResult:
        name, shadow = self.choose(requested)
        result = self.strategies[name].build(ctx, segments)
        if shadow is not None:
            ref = result if name == "full" else self.strategies["full"].build(ctx, segments)
            test = result if shadow == name else self.strategies[shadow].build(ctx, segments)
            with self._lock:
                self.tracker.record(shadow, first_token_kl(ref.logits, test.logits),
                                    bool(ref.logits.argmax() == test.logits.argmax()))
        result.stats.extra["planner"] = {"requested": requested or self.default, "served": name,
                                         "shadow": shadow}
        return result

    def report(self) -> dict:
        return {n: self.tracker.summary(n) for n in self.strategies if n != "full"}
