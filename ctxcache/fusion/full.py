"""``full`` — prefill the whole prompt: the reference every other strategy is measured against."""

from __future__ import annotations

from typing import Sequence

from ctxcache.fusion.base import FusionContext, FusionResult, FusionStrategy, Segment
from ctxcache.fusion.chunks import full_flops


class FullPrefill(FusionStrategy):
    name = "full"
    exact = True

    def build(self, ctx: FusionContext, segments: Sequence[Segment]) -> FusionResult:
        stats, timer, pieces, ids = self.start(ctx, segments)
        with timer("prefill"):
            out = ctx.engine.prefill(ids)
        n, L = len(ids), ctx.engine.spec.num_layers
        stats.prompt_tokens = stats.recomputed_tokens = n
        stats.computed_token_layers = stats.total_token_layers = n * L
        stats.flops = stats.full_flops = full_flops(ctx, n)
        return FusionResult(out.kv, out.logits[-1], stats, token_ids=ids)
