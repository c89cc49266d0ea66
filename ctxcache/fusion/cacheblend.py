"""``cacheblend`` — CacheBlend: reuse chunk K/V, recompute the tokens whose K/V deviates most.

Chunks are cached alone, so their K/V lacks the attention to the chunks before them. CacheBlend
observes that only a few tokens' K/V deviate much, and that the tokens deviating most in one
layer are largely the ones deviating most in the next. So: compute layer 0 for all tokens, then
at layer 1 compare fresh vs cached K/V of every chunk token and keep the top ``r`` (default
15 %), narrowing gradually over the next layers (``widen`` / ``narrow_layers``); the text
(question) tokens are always computed. See ``selective.py`` for the layer loop.

The first layers' cost is paid in full here (selection from live deviations), so the compute
floor is ≈ 2/L + r of full prefill; loading of chunk k+1 overlaps with work on chunk k through the
store's prefetch when chunk caches live below the GPU tier.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ctxcache.errors import InvalidInputError
from ctxcache.fusion.base import FusionContext, FusionResult, FusionStats, FusionStrategy, Segment
from ctxcache.fusion.chunks import assemble, full_flops
from ctxcache.fusion.selective import ratio_schedule, selective_prefill, top_fraction


class CacheBlend(FusionStrategy):
    name = "cacheblend"

    def __init__(self, recompute_ratio: float = 0.15, select_from: int = 1, widen: float = 1.5,
                 narrow_layers: int = 3):
        if not 0.0 <= recompute_ratio <= 1.0:
            raise InvalidInputError("recompute_ratio must be in [0, 1]")
        if select_from < 0 or narrow_layers < 1 or widen < 1.0:
            raise InvalidInputError("select_from >= 0, narrow_layers >= 1 and widen >= 1 required")
        self.r = recompute_ratio
        self.select_from = select_from
        self.widen = widen
        self.narrow_layers = narrow_layers

    def describe(self) -> dict:
        return {"name": self.name, "recompute_ratio": self.r, "select_from": self.select_from,
                "widen": self.widen, "narrow_layers": self.narrow_layers}

    def select_layers(self, num_layers: int) -> set[int]:
        last = min(self.select_from + self.narrow_layers, num_layers)
        return set(range(min(self.select_from, num_layers - 1), last))

    def build(self, ctx: FusionContext, segments: Sequence[Segment]) -> FusionResult:
        engine = ctx.engine
        stats, timer, pieces, ids = self.start(ctx, segments, recompute_ratio=self.r)
        with timer("load"):
            asm = assemble(ctx, pieces, stats)
        kv, cached = asm.kv, asm.cached
        exact = _exact_prefix(pieces, cached)
        n_cand = int((cached & ~exact).sum())

        def selector(layer, active, dev):
            must = torch.isinf(dev)
            frac = ratio_schedule(self.r, layer, self.select_from, self.widen, self.narrow_layers)
            return top_fraction(dev, must, frac, n_cand)

        with timer("recompute"):
            out = selective_prefill(engine, torch.tensor(ids, device=engine.device), kv, cached,
                                    exact, selector, self.select_layers(engine.spec.num_layers),
                                    inplace=True,
                                    ready=asm.ready)
        fill_stats(stats, ctx, ids, cached, out)
        return FusionResult(out.kv, out.logits, stats, token_ids=ids)


def _exact_prefix(pieces, cached: torch.Tensor) -> torch.Tensor:
    """Leading ``prefix`` pieces are cached at their own positions: exact, never recomputed."""
    exact = torch.zeros_like(cached)
    for p in pieces:
        if p.role != "prefix":
            break
        exact[p.start:p.end] = True
    return exact


def fill_stats(stats: FusionStats, ctx: FusionContext, ids, cached, out) -> None:
    n, L = len(ids), ctx.engine.spec.num_layers
    stats.prompt_tokens = n
    stats.recomputed_tokens = out.recomputed.numel()
    stats.reused_tokens = int(cached.sum()) - int(cached[out.recomputed].sum())
    stats.computed_token_layers = out.computed_token_layers
    stats.total_token_layers = n * L
    stats.flops = out.flops
    stats.full_flops = full_flops(ctx, n)
