"""``kvcomm`` — KVCOMM: cross-context K/V reuse with offsets estimated from an anchor pool.

For an agent's prompt (its prefix, the shared segments, its turn) each shared segment takes the
cheapest safe route (``choose``):

* **exact** — its K/V under exactly this context is cached (prefix-style hit): used as is;
* **estimate** — anchors of this segment under similar contexts exist: base K/V + the blended
  anchor offset (``anchors.py``), then CacheBlend's selective recompute of the few tokens whose
  corrected K/V still deviates most (``recompute_ratio``, 5 % by default);
* **calibrate** — no similar anchor: the segment is recomputed in full in this context, and the
  exact result becomes a new anchor (so the next agent estimates instead).

With the pool disabled this is CacheBlend over the base encodings (and ``recompute_ratio=0``
is naive reuse); with ``recompute_ratio=1`` every token is recomputed (no sharing).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ctxcache.agents.anchors import AnchorPool, apply_offsets, offset_of, signatures
from ctxcache.errors import InvalidInputError
from ctxcache.fusion.base import FusionContext, FusionResult, FusionStrategy, Segment
from ctxcache.fusion.cacheblend import CacheBlend, exact_prefix, fill_stats
from ctxcache.fusion.chunks import (
    Source, _first_position, cached_mask, chunk_kv, ids_array, load_prefix,
)
from ctxcache.fusion.execute import execute
from ctxcache.fusion.selective import Selection, SelectivePlan, keep_count, ratio_schedule
from ctxcache.kv.keys import chunk_key


class KVComm(FusionStrategy):
    name = "kvcomm"

    def __init__(self, recompute_ratio: float = 0.05, pool: AnchorPool | None = None,
                 use_anchors: bool = True, **pool_options):
        if not 0.0 <= recompute_ratio <= 1.0:
            raise InvalidInputError("recompute_ratio must be in [0, 1]")
        self.r = recompute_ratio
        self.pool = pool or AnchorPool(**pool_options)
        self.use_anchors = use_anchors
        self.blend = CacheBlend(recompute_ratio)  # selection schedule

    def describe(self) -> dict:
        return {"name": self.name, "recompute_ratio": self.r, "use_anchors": self.use_anchors,
                "min_similarity": self.pool.min_similarity, **self.pool.counters}

    def build(self, ctx: FusionContext, segments: Sequence[Segment]) -> FusionResult:
        engine = ctx.engine
        stats, timer, pieces, ids = self.start(ctx, segments, recompute_ratio=self.r)
        arr = ids_array(pieces)
        chunks = [p for p in pieces if p.role == "chunk"]
        with timer("lookup"):
            prefix = load_prefix(ctx, pieces, stats)
            sources = [Source(0, prefix.length, prefix.kv, 0)] if prefix.kv is not None else []
            context_keys = _context_keys(engine.fingerprint, pieces)
            routes, bases, shift = {}, {}, {}
            sigs = signatures(engine, arr, [p.start for p in chunks]) if self.use_anchors \
                else None
            for i, p in enumerate(chunks):
                exact = ctx.store.get(chunk_key(engine.fingerprint, p.arr,
                                                context_keys[p.start]), ctx.namespace)
                if exact is not None:  # this segment under exactly this context
                    stats.chunk_hits += 1
                    sources.append(Source(p.start, p.end, exact.kv,
                                          p.start - _first_position(exact.kv)))
                    routes[p.start] = "exact"
                    continue
                base = chunk_kv(ctx, p.arr, stats)[1]  # prefix-free: what anchors are relative to
                bases[p.start] = base
                shift[p.start] = p.start - _first_position(base)
                kv, route = base, "base"
                if self.use_anchors:
                    parts, _ = self.pool.estimate(ctx, p.arr, sigs[i])
                    if parts:
                        kv, route = apply_offsets(base, parts), "estimate"
                    else:
                        route = "calibrate"
                routes[p.start] = route
                sources.append(Source(p.start, p.end, kv, shift[p.start]))
        n = len(ids)
        cached = cached_mask(n, sources)
        calib = np.zeros(n, dtype=bool)
        for p in chunks:
            if routes[p.start] == "calibrate":
                calib[p.start:p.end] = True
        plan, n_cand = self._plan(pieces, cached, calib, engine.spec.num_layers)
        ex = execute(ctx, arr, sources, plan, timer)
        with timer("learn"):
            for i, p in enumerate(chunks):
                if routes[p.start] != "calibrate":
                    continue
                kv = ex.out.kv
                off = offset_of(engine, kv.k[:, :, p.start:p.end], kv.v[:, :, p.start:p.end],
                                shift[p.start], bases[p.start])
                self.pool.add(ctx, p.arr, sigs[i], off)
                # the exact K/V under this very context: a later identical prompt reuses it
                ctx.store.put_later(kv.slice(p.start, p.end), p.token_ids,
                                    model=engine.fingerprint, namespace=ctx.namespace,
                                    prefix_key=context_keys[p.start])
        fill_stats(stats, ctx, ids, cached, plan, ex.out)
        counts = {r: sum(1 for v in routes.values() if v == r)
                  for r in ("exact", "estimate", "calibrate", "base")}
        shared = sum(len(p.token_ids) for p in chunks)
        # shared tokens recomputed to the last layer: calibrated segments + CacheBlend's pick
        recomputed = int(calib.sum()) + keep_count(self.r, n_cand)
        stats.extra.update({"routes": counts, "cuda_graph": ex.graph, "shared_tokens": shared,
                            "shared_reuse_rate": max(0.0, 1.0 - recomputed / shared)
                            if shared else 0.0})
        return FusionResult(ex.out.kv, ex.out.logits, stats, token_ids=ids,
                            storage=ex.storage)

    def _plan(self, pieces, cached: np.ndarray, calib: np.ndarray, L: int
              ) -> tuple[SelectivePlan, int]:
        """CacheBlend's plan, with the calibrating segments' tokens never dropped; and the
        number of candidates its selections choose from."""
        rows = np.nonzero(~exact_prefix(pieces, cached.size))[0]
        must = ~cached[rows] | calib[rows]
        n_must = int(must.sum())
        n_cand = rows.size - n_must
        b = self.blend
        sels = [Selection(layer, n_must + keep_count(
            ratio_schedule(self.r, layer, b.select_from, b.widen, b.narrow_layers), n_cand))
            for layer in b.select_layers(L)]
        return SelectivePlan(rows, must, sels), n_cand


def _context_keys(fingerprint: str, pieces) -> dict[int, str]:
    """Per chunk start: a key of everything before it (its exact context)."""
    out, prev = {}, None
    for p in pieces:
        if p.role == "chunk":
            out[p.start] = "ctx:" + (prev or "")
        prev = chunk_key(fingerprint, p.arr, prev)
    return out
