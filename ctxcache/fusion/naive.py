"""``naive`` — concatenate chunk caches, RoPE-shift each to its place, compute only the text.

TurboRAG-style reuse without its fine-tuning: cross-chunk attention is simply missing from the
reused K/V, which is what CacheBlend's selective recompute repairs.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ctxcache.engine.flops import prefill_flops
from ctxcache.fusion.base import FusionContext, FusionResult, FusionStrategy, Segment
from ctxcache.fusion.chunks import cached_mask, full_flops, ids_array, lookup
from ctxcache.fusion.execute import execute
from ctxcache.fusion.selective import SelectivePlan


class NaiveReuse(FusionStrategy):
    name = "naive"

    def build(self, ctx: FusionContext, segments: Sequence[Segment]) -> FusionResult:
        engine = ctx.engine
        stats, timer, pieces, ids = self.start(ctx, segments)
        with timer("lookup"):
            _, sources = lookup(ctx, pieces, stats)
        text = np.nonzero(~cached_mask(len(ids), sources))[0]
        # the text runs through all layers; chunk K/V stays as loaded
        ex = execute(ctx, ids_array(pieces), sources,
                     SelectivePlan(text, np.ones(text.size, dtype=bool)),
                     timer)
        n, t, L = len(ids), int(text.size), engine.spec.num_layers
        stats.prompt_tokens = n
        stats.reused_tokens = n - t
        stats.recomputed_tokens = t
        stats.computed_token_layers = t * L
        stats.total_token_layers = n * L
        stats.flops = prefill_flops(engine.spec, t, n - t)
        stats.full_flops = full_flops(ctx, n)
        stats.extra["cuda_graph"] = ex.graph
        return FusionResult(ex.out.kv, ex.out.logits, stats, token_ids=ids, storage=ex.storage)
