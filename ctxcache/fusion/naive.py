"""``naive`` — concatenate chunk caches, RoPE-shift each to its place, compute only the text.

TurboRAG-style reuse without its fine-tuning: cross-chunk attention is simply missing from the
reused K/V, which is what CacheBlend's selective recompute repairs.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ctxcache.engine.flops import prefill_flops
from ctxcache.engine.kvcache import KVCache
from ctxcache.fusion.base import FusionContext, FusionResult, FusionStats, FusionStrategy, Segment, Timer
from ctxcache.fusion.chunks import all_ids, assemble, full_flops, resolve


class NaiveReuse(FusionStrategy):
    name = "naive"

    def build(self, ctx: FusionContext, segments: Sequence[Segment]) -> FusionResult:
        engine = ctx.engine
        stats = FusionStats(self.name)
        timer = Timer(stats)
        pieces = resolve(ctx, segments)
        ids = all_ids(pieces)
        with timer("load"):
            kv, cached = assemble(ctx, pieces, stats)
        text_idx = torch.nonzero(~cached).flatten()
        # text tokens attend to all cached tokens before them (and to earlier text tokens:
        # computed together below, causal by position)
        reuse_idx = torch.nonzero(cached).flatten()
        past = kv.select(reuse_idx)
        with timer("prefill"):
            out = engine.prefill([ids[i] for i in text_idx.tolist()],
                                 positions=kv.positions[text_idx], kv=past)
        K, V = kv.k.clone(), kv.v.clone()
        K[:, :, text_idx], V[:, :, text_idx] = out.kv.k, out.kv.v
        n, t, L = len(ids), text_idx.numel(), engine.spec.num_layers
        stats.prompt_tokens = n
        stats.reused_tokens = n - t
        stats.recomputed_tokens = t
        stats.computed_token_layers = t * L
        stats.total_token_layers = n * L
        stats.flops = prefill_flops(engine.spec, t, n - t)
        stats.full_flops = full_flops(ctx, n)
        return FusionResult(KVCache(K, V, kv.positions), out.logits[-1], stats, token_ids=ids)
