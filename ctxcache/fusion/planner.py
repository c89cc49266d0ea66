"""Which strategy serves a request.

A configurable default, or ``auto``: the fastest strategy whose measured fidelity on recent
traffic stays above a threshold, else full prefill. Fidelity is measured by *shadow checks*: on a
sampled fraction of requests the planner also runs full prefill and records how close the
strategy's first-token distribution came (top-1 agreement and KL). While a cheaper strategy has
too few samples, requests are served by full prefill and that strategy is evaluated in the
shadow, so ``auto`` never serves an unproven approximation.

Speed comes from a ``CostModel`` calibrated on this engine: ``auto`` picks the proven strategy
with the lowest predicted time for this prompt (counting chunks that still have to be built),
and full prefill whenever that is predicted faster — so the cache never makes a request slower.
The same guard applies to the configured default strategy (an explicit per-request strategy is
honoured as asked).
"""

from __future__ import annotations

import random
import threading
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ctxcache.errors import InvalidInputError
from ctxcache.fusion.base import FusionContext, FusionResult, FusionStrategy, Segment
from ctxcache.fusion.costmodel import CostModel
from ctxcache.kv.keys import chunk_key

# cheapest first (typical compute share of full prefill)
AUTO_ORDER = ("naive", "ape", "kvcomm", "cacheblend", "cachecraft", "prefix")


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
                 seed: int | None = None, cost_model: CostModel | None = None):
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
        self.cost_model = cost_model
        self.served: Counter = Counter()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def _qualified(self, name: str) -> bool:
        s = self.tracker.summary(name)
        return s["n"] >= self.min_samples and s["top1"] >= self.min_top1

    def choose(self, requested: str | None = None, sizes: tuple[int, int] | None = None
               ) -> tuple[str, str | None]:
        """(strategy to serve with, strategy to evaluate in the shadow or None).

        ``sizes`` = (prompt tokens, tokens of chunks not cached yet) lets the cost model veto
        reuse that would be slower than full prefill (``auto`` and the configured default)."""
        name = requested or self.default
        cm = self.cost_model if sizes is not None else None
        if name != "auto":
            if name not in self.strategies:
                raise InvalidInputError(
                    f"unknown strategy {name!r}; use one of {sorted(self.strategies)} or 'auto'")
            if cm is not None and requested is None and name != "full" and \
                    not cm.cheaper_than_full(name, *sizes):
                return "full", None
            return name, name if name != "full" and self._rng.random() < self.sample_rate else None
        cands = [n for n in AUTO_ORDER if n in self.strategies]
        proven = [n for n in cands if self._qualified(n)]
        if cm is not None:
            proven = [n for n in proven if cm.cheaper_than_full(n, *sizes)]
            proven.sort(key=lambda n: cm.predict(n, *sizes) or 0.0)
        if proven:
            n = proven[0]
            return n, n if self._rng.random() < self.sample_rate else None
        unproven = [n for n in cands if self.tracker.summary(n)["n"] < self.min_samples]
        # every unproven strategy gets evaluated in turn (random, so none starves)
        return "full", (self._rng.choice(unproven) if unproven else None)

    @staticmethod
    def sizes(ctx: FusionContext, segments: Sequence[Segment]) -> tuple[int, int]:
        """(prompt tokens, tokens of chunks with no cache yet) — host lookups only."""
        fp = ctx.engine.fingerprint
        prefix = [t for s in segments if s.role == "prefix" for t in (s.token_ids or [])]
        pkey = chunk_key(fp, prefix) if prefix else None
        n = missing = 0
        for s in segments:
            k = len(s.token_ids or [])
            n += k
            if s.role == "chunk" and s.token_ids:
                if not (pkey and ctx.store.contains(chunk_key(fp, s.token_ids, pkey),
                                                    ctx.namespace)) and \
                        not ctx.store.contains(chunk_key(fp, s.token_ids), ctx.namespace):
                    missing += k
        return n, missing

    def run(self, ctx: FusionContext, segments: Sequence[Segment],
            requested: str | None = None, recompute_ratio: float | None = None
            ) -> FusionResult:
        """Build with the chosen strategy; ``recompute_ratio`` overrides the ratio of a
        strategy that has one (full prefill, if chosen, recomputes everything anyway)."""
        sizes = self.sizes(ctx, segments) if self.cost_model is not None else None
        name, shadow = self.choose(requested, sizes)
        strategy = self.strategies[name]
        if recompute_ratio is not None and strategy.ratio_attr is not None:
            strategy = strategy.with_ratio(recompute_ratio)
        result = strategy.build(ctx, segments)
        if shadow is not None:
            ref = result if name == "full" else self.strategies["full"].build(ctx, segments)
            test = result if shadow == name else self.strategies[shadow].build(ctx, segments)
            with self._lock:
                self.tracker.record(shadow, first_token_kl(ref.logits, test.logits),
                                    bool(ref.logits.argmax() == test.logits.argmax()))
        result.stats.extra["planner"] = {"requested": requested or self.default, "served": name,
                                         "shadow": shadow}
        with self._lock:
            self.served[name] += 1
        return result

    def report(self) -> dict:
        return {n: self.tracker.summary(n) for n in self.strategies if n != "full"}

    def describe(self) -> dict:
        """Fidelity per strategy, how often each served, and the cost model in use."""
        out = {"default": self.default, "fidelity": self.report(), "served": dict(self.served)}
        if self.cost_model is not None:
            out["cost_model"] = {"coeffs": self.cost_model.coeffs, "key": self.cost_model.key}
        return out
