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
from ctxcache.errors import InvalidInputError
from ctxcache.fusion.base import FusionContext, FusionResult, FusionStrategy, Segment
from ctxcache.fusion.chunks import Source, full_flops, ids_array
from ctxcache.fusion.execute import execute
from ctxcache.fusion.selective import SelectivePlan
from ctxcache.kv.keys import chunk_key


class PrefixReuse(FusionStrategy):
    name = "prefix"
    exact = True

    # rows recomputed rather than reading a longer stretch from the chunk store. On a GPU a
    # few extra rows cost less than a store read (host-to-device copy, assembly launches): 128;
    # on the CPU compute dominates and any longer stretch from the store wins: 0. None: by
    # the engine's device.
    store_slack_tokens: int | None = None

    def _resident(self, ctx: FusionContext, pieces, ids: list[int], chain: list[str],
                  sources: list[Source], stats) -> int:
        """Take the serving pool's resident rows (``ctx.resident``) as the first source; return
        the index of the first piece the store lookup continues from.

        The pool's span is block-aligned, the store's message-aligned. Where the span ends
        inside a piece, the store may hold that piece and the ones after it (checked by key,
        no data moved): the span is cut back to the piece's start when the store reaches
        further than the span (by more than ``store_slack_tokens``), else the rows
        after the span are recomputed."""
        res = ctx.resident
        if res is None or not res.n_tokens:
            return 0
        n = res.n_tokens
        if n >= len(ids) or ids[:n] != res.token_ids:
            raise InvalidInputError("the resident prefix offered is not of this prompt")
        first = next(i for i, p in enumerate(pieces) if p.end > n)  # the last piece is text
        if pieces[first].start < n:  # the span ends inside this piece
            reach = pieces[first].start
            for p, key in zip(pieces[first:], chain[first:]):
                if p.role == "text" or not ctx.store.contains(key, ctx.namespace):
                    break
                reach = p.end
            slack = self.store_slack_tokens
            if slack is None:
                slack = 0 if ctx.engine.device.type == "cpu" else 128
            if reach > n + slack:
                n = pieces[first].start
            else:
                first = len(pieces)  # the rows after the span are computed, none looked up
        if n:
            sources.append(Source(0, n, res.kv.slice(0, n), 0))
            stats.extra["pool_tokens"] = n
        return first

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
            first = self._resident(ctx, pieces, ids, chain, sources, stats)
            for p, key in zip(pieces[first:], chain[first:]):
                if p.role == "text" or (sources and p.start != sources[-1].end):
                    break
                e = store.get(key, ctx.namespace)
                if e is None or e.meta.model != engine.fingerprint:
                    break
                kv = e.kv if e.kv.k.dtype == engine.dtype else e.kv.to(dtype=engine.dtype)
                sources.append(Source(p.start, p.end, kv, 0))
                stats.chunk_hits += 1
        n_past = sources[-1].end if sources else 0
        rows = np.arange(n_past, len(ids))
        # exact: every row after the hits runs through all layers
        ex = execute(ctx, ids_array(pieces), sources,
                     SelectivePlan(rows, np.ones(rows.size, dtype=bool)),
                     timer)
        out = ex.out
        # store the cacheable segments the store lacks under their chained keys (write-behind:
        # off the time to first token) — the pool's pages are a cache, the store is the record
        with timer("store"):
            for i, p in enumerate(pieces):
                if p.role == "text":
                    continue
                if p.end <= n_past and (i >= first or store.contains(chain[i], ctx.namespace)):
                    continue
                if p.end > n_past:
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
