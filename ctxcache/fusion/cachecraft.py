"""``cachecraft`` — Cache-Craft: per-chunk reuse decisions and recompute budgets.

Chunks differ in how much their K/V depends on what comes before them: a self-contained passage
barely attends outside itself, a passage that continues the previous one does. Cache-Craft
measures that dependence and spends recompute where it matters:

* **Context impact** of a chunk = the share of its tokens' attention (head-averaged, at a probe
  layer in the middle of the network) that goes to tokens outside the chunk, excluding the
  prompt's first token (the attention sink). Measured whenever the chunk is used with some
  recompute, kept as an exponential moving average per chunk key.
* **Budget**: ``r_c = base × impact_c / mean impact`` (chunks never measured get ``base``),
  clipped to [0, max]; below ``reuse_below`` the chunk is reused as is, above ``full_above`` it
  is recomputed entirely. Within a chunk, tokens are picked by K/V deviation as in CacheBlend.
* **Variants**: when a chunk needed a large share of recompute, its repaired K/V is stored as a
  variant keyed by chunk + the keys of the chunks before it, and used the next time the chunk
  appears after the same context.
* **Eviction value**: every reuse reports the compute it saved to the store (GDSF priority).
* **Selection from stored metadata**: the layer-1 K/V deviation of each chunk token observed on
  a chunk's first uses is kept; once every chunk of a prompt has such scores, tokens are chosen
  *before* any layer runs (no full first layer, no live probe), which lowers the compute floor
  from ≈ 2/L + r to ≈ r of full prefill.

The impact table lives in the strategy instance (process memory); it is rebuilt from traffic
after a restart — an approximation of the paper's persisted chunk metadata.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import xxhash

from ctxcache.engine.flops import prefill_flops
from ctxcache.errors import InvalidInputError
from ctxcache.fusion.base import FusionContext, FusionResult, FusionStrategy, Segment
from ctxcache.fusion.cacheblend import exact_prefix, fill_stats
from ctxcache.fusion.chunks import Piece, cached_mask, ids_array, load_chunk, lookup
from ctxcache.fusion.execute import execute
from ctxcache.fusion.selective import Selection, SelectivePlan, keep_count, ratio_schedule
from ctxcache.kv.keys import chunk_key


@dataclass
class ChunkImpact:
    impact: float
    uses: int = 1


class CacheCraft(FusionStrategy):
    name = "cachecraft"
    ratio_attr = "base"

    def __init__(self, base_ratio: float = 0.15, max_ratio: float = 1.0,
                 reuse_below: float = 0.02, full_above: float = 0.9, variant_above: float = 0.5,
                 ema: float = 0.5, widen: float = 1.5, narrow_layers: int = 3,
                 preselect: bool = True, probe_uses: int = 3):
        for name, v in (("base_ratio", base_ratio), ("max_ratio", max_ratio),
                        ("reuse_below", reuse_below), ("full_above", full_above),
                        ("variant_above", variant_above), ("ema", ema)):
            if not 0.0 <= v <= 1.0:
                raise InvalidInputError(f"{name} must be in [0, 1]")
        self.base = base_ratio
        self.max_ratio = max_ratio
        self.reuse_below = reuse_below
        self.full_above = full_above
        self.variant_above = variant_above
        self.ema = ema
        self.widen = widen
        self.narrow_layers = narrow_layers
        self.table: dict[str, ChunkImpact] = {}
        self.token_scores: dict[str, torch.Tensor] = {}  # chunk key → layer-1 deviation [n]
        self.preselect = preselect
        self.probe_uses = probe_uses

    def describe(self) -> dict:
        return {"name": self.name, "base_ratio": self.base, "reuse_below": self.reuse_below,
                "full_above": self.full_above, "variant_above": self.variant_above,
                "tracked_chunks": len(self.table)}

    def fresh(self) -> "CacheCraft":
        """The same configuration with nothing learned (the state of a chunk's first uses)."""
        out = copy.copy(self)
        out.table, out.token_scores = {}, {}
        return out

    def is_cold(self, chunk_keys: Sequence[str]) -> bool:
        """Would a prompt of these chunks probe attention (some chunk seen fewer than
        ``probe_uses`` times)? Such builds are slower; the cost guard prices them apart."""
        return any(self.table.get(k) is None or self.table[k].uses < self.probe_uses
                   for k in chunk_keys)

    # ------------------------------------------------------------------ budgets
    def budgets(self, keys: Sequence[str]) -> list[float]:
        known = [self.table[k].impact for k in keys if k in self.table]
        mean = sum(known) / len(known) if known else None
        out = []
        for k in keys:
            if k not in self.table or not mean:
                out.append(self.base)
                continue
            imp = self.table[k].impact
            if imp < self.reuse_below:
                out.append(0.0)
                continue
            r = min(self.max_ratio, self.base * imp / mean)
            out.append(1.0 if r >= self.full_above else r)
        return out

    def _update(self, key: str, impact: float) -> None:
        cur = self.table.get(key)
        if cur is None:
            self.table[key] = ChunkImpact(impact)
        else:
            cur.impact = (1 - self.ema) * cur.impact + self.ema * impact
            cur.uses += 1

    # ------------------------------------------------------------------ build
    def build(self, ctx: FusionContext, segments: Sequence[Segment]) -> FusionResult:
        engine, store = ctx.engine, ctx.store
        stats, timer, pieces, ids = self.start(ctx, segments)
        chunk_pieces = [p for p in pieces if p.role == "chunk"]
        variant_prefix: dict[int, str] = {}  # chunk start → prefix key of its variant
        context = xxhash.xxh3_128()
        for p in pieces:  # context of each chunk = everything before it
            if p.role == "chunk":
                variant_prefix[p.start] = "ctx:" + context.hexdigest()
            context.update(p.key.encode() if p.key else
                           b"text:" + np.asarray(p.token_ids, dtype=np.int64).tobytes())
        variant_hits: set[int] = set()

        def loader(c, p, prefix, st):
            """A repaired variant for exactly this context first, else the plain chunk."""
            vkey = chunk_key(engine.fingerprint, p.token_ids, variant_prefix[p.start])
            ventry = store.get(vkey, ctx.namespace)
            if ventry is not None:
                variant_hits.add(p.start)
                st.chunk_hits += 1
                return ventry.kv
            return load_chunk(c, p, prefix, st)

        with timer("lookup"):
            _, sources = lookup(ctx, pieces, stats, loader)
        cached = cached_mask(len(ids), sources)
        budgets = self.budgets([p.key for p in chunk_pieces])
        for ci, p in enumerate(chunk_pieces):  # a variant for this context needs no more repair
            if p.start in variant_hits:
                budgets[ci] = 0.0
        pre = self.preselect and bool(chunk_pieces) and all(
            p.key in self.token_scores or p.start in variant_hits for p in chunk_pieces)
        L = engine.spec.num_layers
        # measuring impact needs explicit attention probabilities (costly): only while some
        # chunk of the prompt has been seen fewer than `probe_uses` times
        probing = any(self.table.get(p.key) is None or self.table[p.key].uses < self.probe_uses
                      for p in chunk_pieces)
        plan, kept = self._plan(pieces, chunk_pieces, cached, budgets, pre, L)
        if probing:
            plan.probe_layer = L // 2
        ex = execute(ctx, ids_array(pieces), sources, plan, timer)
        out = ex.out
        with timer("learn"):
            self._learn(out, chunk_pieces)
            if not pre and out.deviations and 1 in out.deviations:
                slots, dev = out.deviations[1]
                slots, dev = slots.cpu().numpy(), dev.float().cpu()
                for p in chunk_pieces:
                    sel = (slots >= p.start) & (slots < p.end)
                    if int(sel.sum()) == len(p.token_ids):
                        self.token_scores[p.key] = dev[torch.from_numpy(sel)]
            shares = [round(k / max(len(p.token_ids), 1), 4) for k, p in zip(kept, chunk_pieces)]
            self._store_variants(ctx, out, chunk_pieces, variant_prefix, budgets, shares)
            for ci, p in enumerate(chunk_pieces):
                saved = prefill_flops(engine.spec, len(p.token_ids)) * (1 - budgets[ci])
                store.reuse_hint(p.key, ctx.namespace, saved)
        fill_stats(stats, ctx, ids, cached, plan, out)
        stats.extra.update({"chunk_budgets": [round(b, 4) for b in budgets],
                            "preselected": bool(pre),
                            "variants_used": len(variant_hits),
                            "recomputed_share": shares, "cuda_graph": ex.graph})
        return FusionResult(out.kv, out.logits, stats, token_ids=ids, storage=ex.storage)

    def _plan(self, pieces, chunk_pieces, cached: np.ndarray, budgets, pre: bool, L: int
              ) -> tuple[SelectivePlan, list[int]]:
        """Rows, selections and the number of tokens of each chunk recomputed to the end.

        Preselected: each chunk's top tokens by stored score are chosen on the host and only
        they (plus the text) run, from layer 0. Otherwise every non-prefix token runs layer 0
        and per-chunk top-k selections by live deviation follow at layers 1…"""
        n = cached.size
        exact = exact_prefix(pieces, n)
        sizes = [len(p.token_ids) for p in chunk_pieces]
        if pre:
            pick = [np.nonzero(~cached & ~exact)[0]]
            kept = []
            for p, r in zip(chunk_pieces, budgets):
                k = keep_count(r, len(p.token_ids))
                kept.append(k)
                if k and p.key in self.token_scores:
                    top = torch.topk(self.token_scores[p.key].float(), k).indices.numpy()
                    pick.append(p.start + top)
                elif k:
                    pick.append(np.arange(p.start, p.start + k))
            rows = np.unique(np.concatenate(pick))
            return SelectivePlan(rows, np.ones(rows.size, dtype=bool)), kept
        rows = np.nonzero(~exact)[0]
        must = ~cached[rows]
        groups = np.full(rows.size, -1, dtype=np.int64)
        for ci, p in enumerate(chunk_pieces):
            groups[(rows >= p.start) & (rows < p.end)] = ci
        sels, kept = [], sizes
        for layer in range(1, min(1 + self.narrow_layers, L)):
            kept = [keep_count(ratio_schedule(r, layer, 1, self.widen, self.narrow_layers), sz)
                    for r, sz in zip(budgets, sizes)]
            sels.append(Selection(layer, int(must.sum()) + sum(kept), kept))
        return SelectivePlan(rows, must, sels, groups, record={1} if L > 1 else set()), kept

    def _learn(self, out, chunk_pieces: list[Piece]) -> None:
        if out.probe_attention is None:
            return
        probs = out.probe_attention  # [n_active, N]
        act = out.recomputed
        for p in chunk_pieces:
            rows = torch.nonzero((act >= p.start) & (act < p.end)).flatten()
            if rows.numel() == 0:
                continue
            pr = probs[rows]
            inside = pr[:, p.start:p.end].sum(dim=1)
            sink = pr[:, 0]
            total = pr.sum(dim=1) - sink
            outside = (total - inside).clamp_min(0)
            impact = float((outside / total.clamp_min(1e-9)).mean())
            self._update(p.key, impact)

    def _store_variants(self, ctx, out, chunk_pieces, variant_prefix, budgets, shares) -> None:
        """Keep the repaired K/V of heavily recomputed chunks as context-specific variants."""
        for ci, p in enumerate(chunk_pieces):
            if shares[ci] >= self.variant_above and budgets[ci] > 0:
                ctx.store.put_later(out.kv.slice(p.start, p.end), p.token_ids,
                                    model=ctx.engine.fingerprint, namespace=ctx.namespace,
                                    prefix_key=variant_prefix[p.start],
                                    recompute_cost=prefill_flops(ctx.engine.spec,
                                                                 len(p.token_ids), p.start),
                                    extra={"variant_of": p.key})
