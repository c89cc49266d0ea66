"""``ape`` — Adaptive Parallel Encoding.

Contexts are encoded *in parallel*: each chunk right after one shared prefix (the system prompt),
all starting at the same position, so a chunk's cache is valid wherever it is used after that
prefix (it is keyed by chunk + prefix). The query comes after the longest chunk. Parallel
encoding skews the query's attention (several chunks now claim the same positions and each has
its own "first token" sink), and APE corrects the distribution on the context part with:

* an attention **temperature** ``T``: context logits are divided by T (implemented exactly by
  scaling the context keys by 1/T once, so the decode loop needs no special kernel), and
* a **scaling factor** ``S`` on the context part's attention weight (implemented as the additive
  bias log S on context keys, kept for the whole decode).

Defaults T = 0.9 and S = 0.9 are in the range the APE paper reports; both are configurable, and
``benchmarks/fidelity.py --ape-grid`` measures the choice on real data.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ctxcache.engine.flops import prefill_flops
from ctxcache.engine.kvcache import KVCache
from ctxcache.errors import InvalidInputError
from ctxcache.fusion.base import FusionContext, FusionResult, FusionStrategy, Segment
from ctxcache.fusion.chunks import chunk_kv, full_flops
from ctxcache.kv.keys import chunk_key


class APE(FusionStrategy):
    name = "ape"

    def __init__(self, temperature: float = 0.9, scale: float = 0.9):
        if not 0.0 < temperature <= 4.0 or not 0.0 < scale <= 4.0:
            raise InvalidInputError("APE temperature and scale must be in (0, 4]")
        self.temperature = temperature
        self.scale = scale

    def describe(self) -> dict:
        return {"name": self.name, "temperature": self.temperature, "scale": self.scale}

    def build(self, ctx: FusionContext, segments: Sequence[Segment]) -> FusionResult:
        engine = ctx.engine
        stats, timer, pieces, ids = self.start(ctx, segments, temperature=self.temperature,
                                               scale=self.scale)
        # layout: [prefix...] [contexts...] [query = the trailing text run]
        n_prefix = 0
        while n_prefix < len(pieces) and pieces[n_prefix].role == "prefix":
            n_prefix += 1
        q_start = len(pieces)
        while q_start > n_prefix and pieces[q_start - 1].role == "text":
            q_start -= 1
        prefix_ids = [t for p in pieces[:n_prefix] for t in p.token_ids]
        contexts = pieces[n_prefix:q_start]
        query_ids = [t for p in pieces[q_start:] for t in p.token_ids]
        s = len(prefix_ids)
        with timer("load"):
            prefix_kv, prefix_key = None, None
            if prefix_ids:
                prefix_key, prefix_kv = chunk_kv(ctx, prefix_ids, stats)
            parts = [prefix_kv] if prefix_kv is not None else []
            ctx_len = 0
            built = 0
            for p in contexts:
                cacheable = p.role == "chunk"
                before = stats.chunk_misses
                _, kv = chunk_kv(ctx, p.token_ids, stats, prefix=prefix_kv,
                                 prefix_key=prefix_key, store_new=cacheable)
                if not cacheable:  # glue text between contexts: encoded now, never stored
                    stats.chunk_misses = before
                    built += len(p.token_ids)
                parts.append(kv)
                ctx_len = max(ctx_len, len(p.token_ids))
            kv = KVCache.cat([x.to(engine.device) for x in parts]) if parts else None
        n_ctx_tokens = sum(len(p.token_ids) for p in contexts)
        if kv is not None and n_ctx_tokens:
            k = kv.k.clone()
            k[:, :, s:] = (k[:, :, s:].float() / self.temperature).to(k.dtype)
            kv = KVCache(k, kv.v, kv.positions)
        past = kv.num_tokens if kv is not None else 0
        bias = torch.zeros(past + len(query_ids), device=engine.device)
        bias[s:past] = math.log(self.scale)
        q_pos = torch.arange(s + ctx_len, s + ctx_len + len(query_ids), device=engine.device)
        with timer("prefill"):
            out = engine.prefill(query_ids, positions=q_pos, kv=kv, key_bias=bias)
        full_kv = KVCache.cat([kv, out.kv]) if kv is not None else out.kv
        n, L = len(ids), engine.spec.num_layers
        stats.prompt_tokens = n
        stats.reused_tokens = n - len(query_ids) - built
        stats.recomputed_tokens = len(query_ids) + built
        stats.computed_token_layers = (len(query_ids) + built) * L
        stats.total_token_layers = n * L
        stats.flops = prefill_flops(engine.spec, len(query_ids), past) + sum(
            prefill_flops(engine.spec, len(p.token_ids), s) for p in contexts if p.role != "chunk")
        stats.full_flops = full_flops(ctx, n)
        stats.extra["query_start_position"] = s + ctx_len
        return FusionResult(full_kv, out.logits[-1], stats, key_bias=bias, token_ids=ids)

    @staticmethod
    def chunk_key_after(ctx: FusionContext, prefix_ids: list[int], ids: list[int]) -> str:
        """The cache key APE uses for a chunk encoded after ``prefix_ids`` (for pre-warming)."""
        fp = ctx.engine.fingerprint
        pk = chunk_key(fp, prefix_ids) if prefix_ids else None
        return chunk_key(fp, ids, pk)
