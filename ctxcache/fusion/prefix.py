"""``prefix`` — reuse only the longest cached prefix (SGLang RadixAttention / vLLM APC style).

Each segment's cache is keyed by its tokens *and the key of everything before it* (a chain, like
a radix tree at segment granularity), so a hit is exact: the K/V was computed under the same
prefix at the same positions. Segments after the first miss are prefilled and stored under their
chained keys for the next request. Exact by construction: KL vs full prefill ≈ 0.
"""

from __future__ import annotations

from typing import Sequence

from ctxcache.engine.flops import prefill_flops
from ctxcache.engine.kvcache import KVCache
from ctxcache.fusion.base import FusionContext, FusionResult, FusionStrategy, Segment
from ctxcache.fusion.chunks import full_flops
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
        reused: list[KVCache] = []
        with timer("load"):
            for p, key in zip(pieces, chain):
                if p.role == "text":
                    break
                e = store.get(key, ctx.namespace, device=engine.device)
                if e is None or e.meta.model != engine.fingerprint:
                    break
                reused.append(e.kv.to(engine.device, engine.dtype))
                stats.chunk_hits += 1
        n_hit = len(reused)
        past = KVCache.cat(reused) if reused else None
        n_past = past.num_tokens if past is not None else 0
        rest = ids[n_past:]
        with timer("prefill"):
            out = engine.prefill(rest, kv=past)
        # store the newly computed cacheable segments under their chained keys (write-behind:
        # off the time to first token)
        with timer("store"):
            off = 0
            for i in range(n_hit, len(pieces)):
                p = pieces[i]
                n = len(p.token_ids)
                if p.role != "text":
                    stats.chunk_misses += 1
                    store.put_later(out.kv.slice(off, off + n), p.token_ids,
                                    model=engine.fingerprint, namespace=ctx.namespace,
                                    prefix_key=chain[i - 1] if i else None,
                                    recompute_cost=prefill_flops(engine.spec, n, p.start))
                off += n
        kv = KVCache.cat([past, out.kv]) if past is not None else out.kv
        L = engine.spec.num_layers
        stats.prompt_tokens = len(ids)
        stats.reused_tokens = n_past
        stats.recomputed_tokens = len(rest)
        stats.computed_token_layers = len(rest) * L
        stats.total_token_layers = len(ids) * L
        stats.flops = prefill_flops(engine.spec, len(rest), n_past)
        stats.full_flops = full_flops(ctx, len(ids))
        return FusionResult(kv, out.logits[-1], stats, token_ids=ids)
