"""``prefix`` — reuse only the longest cached prefix (SGLang RadixAttention / vLLM APC style).

Each segment's cache is keyed by its tokens *and the key of everything before it* (a chain, like
a radix tree at segment granularity), so a hit is exact: the K/V was computed under the same
prefix at the same positions. Segments after the first miss are computed over the hits and
stored under their chained keys for the next request. Exact by construction: KL vs full ≈ 0.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ctxcache.engine.flops import prefill_flops
from ctxcache.fusion.base import FusionContext, FusionResult, FusionStrategy, Segment
from ctxcache.fusion.chunks import Source, full_flops, ids_array
from ctxcache.fusion.execute import execute
from ctxcache.fusion.selective import SelectivePlan
from ctxcache.kv.keys import chunk_key


class PrefixReuse(FusionStrategy):
    name = "prefix"

    def build(self, ctx: FusionContext, segments: Sequence[Segment]) -> FusionResult:
        engine, store = ctx.engine, ctx.store
        stats, timer, pieces, ids = self.start(ctx, segments)
        chain: list[str] = []
        prev = None
        for p in pieces:
            prev = chunk_key(engine.fingerprint, p.token_ids, prev)
            chain.append(prev)
        sources: list[Source] = []
        with timer("lookup"):
            for p, key in zip(pieces, chain):
                if p.role == "text":
                    break
                e = store.get(key, ctx.namespace)
                if e is None or e.meta.model != engine.fingerprint:
                    break
                kv = e.kv if e.kv.k.dtype == engine.dtype else e.kv.to(dtype=engine.dtype)
                sources.append(Source(p.start, p.end, kv, 0))
                stats.chunk_hits += 1
        n_hit = len(sources)
        n_past = pieces[n_hit].start if n_hit < len(pieces) else len(ids)
        rows = np.arange(n_past, len(ids))
        # exact: every row after the hits runs through all layers
        ex = execute(ctx, ids_array(pieces), sources,
                     SelectivePlan(rows, np.ones(rows.size, dtype=bool)),
                     timer)
        out = ex.out
        # store the newly computed cacheable segments under their chained keys (write-behind:
        # off the time to first token)
        with timer("store"):
            for i in range(n_hit, len(pieces)):
                p = pieces[i]
                if p.role != "text":
                    stats.chunk_misses += 1
                    store.put_later(out.kv.slice(p.start, p.end), p.token_ids,
                                    model=engine.fingerprint, namespace=ctx.namespace,
                                    prefix_key=chain[i - 1] if i else None,
                                    recompute_cost=prefill_flops(engine.spec, len(p.token_ids),
                                                                 p.start))
        L = engine.spec.num_layers
        rest = len(ids) - n_past
        stats.prompt_tokens = len(ids)
        stats.reused_tokens = n_past
        stats.recomputed_tokens = rest
        stats.computed_token_layers = rest * L
        stats.total_token_layers = len(ids) * L
        stats.flops = prefill_flops(engine.spec, rest, n_past)
        stats.full_flops = full_flops(ctx, len(ids))
        stats.extra["cuda_graph"] = ex.graph
        return FusionResult(out.kv, out.logits, stats, token_ids=ids, storage=ex.storage)
