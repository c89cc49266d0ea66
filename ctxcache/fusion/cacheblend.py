"""``cacheblend`` — CacheBlend: reuse chunk K/V, recompute the tokens whose K/V deviates most.

Chunks are cached alone, so their K/V lacks the attention to the chunks before them. CacheBlend
observes that only a few tokens' K/V deviate much, and that the tokens deviating most in one
layer are largely the ones deviating most in the next. So: compute layer 0 for all tokens, then
at layer 1 compare fresh vs cached K/V of every chunk token and keep the top ``r`` (default
15 %), narrowing gradually over the next layers (``widen`` / ``narrow_layers``); the text
(question) tokens are always computed. See ``selective.py`` for the layer loop.

The first layers' cost is paid in full here (selection from live deviations), so the compute
floor is ≈ 1/L + r of full prefill. Chunk caches in host memory are read layer by layer on a
side stream while the first layers compute (``chunks.assemble``).

**Question focus** (``query_temperature`` T < 1, from ``focus_from`` prompt tokens on): at long
context every reused chunk still holds K/V that never saw the chunks before it, and the
question's attention spreads over tens of thousands of such keys; the needle far back (the
weakest logit after RoPE's distance decay) is the first to be out-voted. With focus, the
trailing question is computed after the chunks in a second pass, attending over the chunk span
with APE's context adjustment (``ContextGroup``: logits / T, the span's softmax term weighed by
T·LSE), kept for every generated token as well. T = 1 is exactly plain CacheBlend. This is an
approximation beyond full prefill's attention (as APE's is); ``benchmarks/longctx.py`` and
``benchmarks/fidelity.py`` measure what it keeps.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ctxcache.engine.flops import prefill_flops
from ctxcache.engine.runner import ContextGroup
from ctxcache.errors import InvalidInputError
from ctxcache.fusion.base import FusionContext, FusionResult, FusionStats, FusionStrategy, Segment
from ctxcache.fusion.chunks import (
    Piece, cached_mask, full_flops, ids_array, lookup, trailing_text_start,
)
from ctxcache.fusion.execute import Executed, execute
from ctxcache.fusion.selective import (
    Selection, SelectiveOutput, SelectivePlan, keep_count, ratio_schedule, selective_prefill,
)


class CacheBlend(FusionStrategy):
    name = "cacheblend"

    ratio_attr = "r"

    def __init__(self, recompute_ratio: float = 0.15, select_from: int = 1, widen: float = 1.5,
                 narrow_layers: int = 3, sink_tokens: int = 4, per_chunk: bool = False,
                 query_temperature: float = 1.0, focus_from: int | None = None):
        if not 0.0 <= recompute_ratio <= 1.0:
            raise InvalidInputError("recompute_ratio must be in [0, 1]")
        if select_from < 0 or narrow_layers < 1 or widen < 1.0:
            raise InvalidInputError("select_from >= 0, narrow_layers >= 1 and widen >= 1 required")
        if sink_tokens < 0:
            raise InvalidInputError("sink_tokens must be >= 0")
        if not 0.0 < query_temperature <= 1.0 or (focus_from is not None and focus_from < 0):
            raise InvalidInputError("query_temperature must be in (0, 1] and focus_from >= 0")
        self.r = recompute_ratio
        self.select_from = select_from
        self.widen = widen
        self.narrow_layers = narrow_layers
        # each chunk's first tokens were its own attention sink when it was encoded alone:
        # recomputing them in place removes one spurious sink per chunk (a handful of tokens)
        self.sink_tokens = sink_tokens
        # recompute budget spread over chunks (each chunk its share) instead of one global top-k
        self.per_chunk = per_chunk
        # the question's attention over the chunks sharpened (see the module docstring),
        # for prompts of at least ``focus_from`` tokens (None: never)
        self.query_temperature = query_temperature
        self.focus_from = focus_from

    def describe(self) -> dict:
        return {"name": self.name, "recompute_ratio": self.r, "select_from": self.select_from,
                "widen": self.widen, "narrow_layers": self.narrow_layers,
                "sink_tokens": self.sink_tokens, "per_chunk": self.per_chunk,
                "query_temperature": self.query_temperature, "focus_from": self.focus_from}

    def select_layers(self, num_layers: int) -> list[int]:
        last = min(self.select_from + self.narrow_layers, num_layers)
        return list(range(min(self.select_from, num_layers - 1), last))

    def plan(self, pieces: Sequence[Piece], cached: np.ndarray, num_layers: int
             ) -> SelectivePlan:
        rows = np.nonzero(~exact_prefix(pieces, cached.size))[0]
        must = ~cached[rows] | chunk_heads(pieces, cached.size, self.sink_tokens)[rows]
        n_must = int(must.sum())
        n_cand = rows.size - n_must
        layers = self.select_layers(num_layers)
        frac = {layer: ratio_schedule(self.r, layer, self.select_from, self.widen,
                                      self.narrow_layers) for layer in layers}
        if not self.per_chunk:
            sels = [Selection(layer, n_must + keep_count(frac[layer], n_cand))
                    for layer in layers]
            return SelectivePlan(rows, must, sels)
        groups = np.full(rows.size, -1, dtype=np.int64)
        chunks = [p for p in pieces if p.role == "chunk"]
        sizes, musts = [], []
        for ci, p in enumerate(chunks):
            inside = (rows >= p.start) & (rows < p.end)
            groups[inside] = ci
            sizes.append(int((inside & ~must).sum()))
            musts.append(int((inside & must).sum()))
        sels = []
        for layer in layers:
            kept = [keep_count(frac[layer], sz) for sz in sizes]
            # a chunk's count covers its must rows too (they rank first within the chunk)
            sels.append(Selection(layer, n_must + sum(kept),
                                  [k + m for k, m in zip(kept, musts)]))
        return SelectivePlan(rows, must, sels, groups)

    def build(self, ctx: FusionContext, segments: Sequence[Segment]) -> FusionResult:
        engine = ctx.engine
        stats, timer, pieces, ids = self.start(ctx, segments, recompute_ratio=self.r)
        with timer("lookup"):
            _, sources = lookup(ctx, pieces, stats)
        cached = cached_mask(len(ids), sources)
        q_start = self.focus_start(pieces, len(ids))
        if q_start is None:
            plan = self.plan(pieces, cached, engine.spec.num_layers)
            ex = execute(ctx, ids_array(pieces), sources, plan, timer)
            fill_stats(stats, ctx, ids, cached, plan, ex.out)
            stats.extra["cuda_graph"] = ex.graph
            return FusionResult(ex.out.kv, ex.out.logits, stats, token_ids=ids,
                                storage=ex.storage)
        return self._focused(ctx, pieces, ids, sources, cached, q_start, stats, timer)

    def focus_start(self, pieces: Sequence[Piece], n: int) -> int | None:
        """Slot where the focused question starts, or None when focus does not apply (off,
        prompt shorter than ``focus_from``, no chunk before a trailing text)."""
        if self.focus_from is None or n < self.focus_from:
            return None
        q_start = trailing_text_start(pieces)
        if q_start >= n or not any(p.role == "chunk" and p.end <= q_start for p in pieces):
            return None
        return q_start

    def _focused(self, ctx: FusionContext, pieces, ids, sources, cached, q_start: int,
                 stats: FusionStats, timer) -> FusionResult:
        """Plain CacheBlend over the whole prompt, then the question's rows once more from layer
        0 with the chunk span as an APE context group. Causal attention keeps every row before
        the question unchanged by it, so at T = 1 the second pass reproduces the first exactly;
        the question is computed twice (a few tokens) to keep the selection identical."""
        engine = ctx.engine
        n, L = len(ids), engine.spec.num_layers
        plan = self.plan(pieces, cached, L)
        ex: Executed = execute(ctx, ids_array(pieces), sources, plan, timer)
        span = next(p.start for p in pieces if p.role != "prefix")
        group = ContextGroup(span, q_start, self.query_temperature, 1.0)
        rows = np.arange(q_start, n)
        with timer("focus"):
            out = selective_prefill(engine, ids, ex.out.kv,
                                    SelectivePlan(rows, np.ones(rows.size, dtype=bool)),
                                    context_group=group)
        fill_stats(stats, ctx, ids, cached, plan, ex.out)
        m = n - q_start
        stats.computed_token_layers += m * L
        stats.flops += prefill_flops(engine.spec, m, q_start)
        stats.extra.update(cuda_graph=ex.graph, focus_temperature=self.query_temperature)
        return FusionResult(out.kv, out.logits, stats, context_group=group, token_ids=ids,
                            storage=ex.storage)


def exact_prefix(pieces: Sequence[Piece], n: int) -> np.ndarray:
    """Leading ``prefix`` pieces are cached at their own positions: exact, never recomputed."""
    exact = np.zeros(n, dtype=bool)
    for p in pieces:
        if p.role != "prefix":
            break
        exact[p.start:p.end] = True
    return exact


def chunk_heads(pieces: Sequence[Piece], n: int, k: int) -> np.ndarray:
    """The first ``k`` tokens of every chunk (the per-chunk attention sinks)."""
    heads = np.zeros(n, dtype=bool)
    if k:
        for p in pieces:
            if p.role == "chunk":
                heads[p.start:min(p.end, p.start + k)] = True
    return heads


def fill_stats(stats: FusionStats, ctx: FusionContext, ids, cached: np.ndarray,
               plan: SelectivePlan, out: SelectiveOutput) -> None:
    """Counts known on the host: rows without a cache are never dropped, so the cached rows
    recomputed to the end are the final rows minus those."""
    n, L = len(ids), ctx.engine.spec.num_layers
    final = min([len(plan.rows)] + [s.keep for s in plan.selections])
    stats.prompt_tokens = n
    stats.recomputed_tokens = final
    stats.reused_tokens = int(cached.sum()) - (final - int(plan.must.sum()))
    stats.computed_token_layers = out.computed_token_layers
    stats.total_token_layers = n * L
    stats.flops = out.flops
    stats.full_flops = full_flops(ctx, n)
