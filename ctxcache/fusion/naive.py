"""``naive`` — concatenate chunk caches, RoPE-shift each to its place, compute only the text.

TurboRAG-style reuse without its fine-tuning: cross-chunk attention is simply missing from the
reused K/V, which is what CacheBlend's selective recompute repairs.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ctxcache.engine.flops import prefill_flops
from ctxcache.fusion.base import FusionContext, FusionResult, FusionStrategy, Segment
from ctxcache.fusion.chunks import assemble, full_flops, lookup
from ctxcache.fusion.selective import SelectivePlan, selective_prefill


class NaiveReuse(FusionStrategy):
    name = "naive"

    def build(self, ctx: FusionContext, segments: Sequence[Segment]) -> FusionResult:
        engine = ctx.engine
        stats, timer, pieces, ids = self.start(ctx, segments)
        with timer("lookup"):
            _, sources = lookup(ctx, pieces, stats)
        with timer("assembly"):
            asm = assemble(ctx, len(ids), sources)
        text = np.nonzero(~asm.cached)[0]
        with timer("layers"):  # the text runs through all layers; chunk K/V stays as loaded
            out = selective_prefill(engine, ids, asm.kv,
                                    SelectivePlan(text, np.ones(text.size, dtype=bool)),
                                    asm.ready)
        n, t, L = len(ids), int(text.size), engine.spec.num_layers
        stats.prompt_tokens = n
        stats.reused_tokens = n - t
        stats.recomputed_tokens = t
        stats.computed_token_layers = t * L
        stats.total_token_layers = n * L
        stats.flops = prefill_flops(engine.spec, t, n - t)
        stats.full_flops = full_flops(ctx, n)
        return FusionResult(out.kv, out.logits, stats, token_ids=ids, storage=asm.storage)
