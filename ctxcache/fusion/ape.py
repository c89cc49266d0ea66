"""``ape`` — Adaptive Parallel Encoding (Yang, Chen & Chen, ICLR 2025).

Contexts are encoded *in parallel*: each chunk right after one shared prefix (the system prompt),
all starting at the same position, so a chunk's cache is valid wherever it is used after that
prefix (it is keyed by chunk + prefix). The query comes after the longest chunk. Parallel
encoding skews the query's attention (several chunks now claim the same positions), and APE
corrects it on the context part, for the query and every generated token:

* an attention **temperature** ``T`` sharpens the distribution *within* the contexts: their
  logits are divided by T;
* the contexts' share of the softmax is computed as one term whose log-sum-exp is
  ``T · LSE(logits / T) + log S`` beside the ordinary term of the other keys (prefix, query,
  answer). Multiplying the LSE by T brings the sharpened term back to the magnitude of the
  original logits; the **scaling factor** ``S`` then weighs it. This is how the paper's
  reference implementation combines the parts (``ContextGroup``); adding ``log S`` to the
  sharpened logits alone, without the ``T ·`` on the LSE, inflates the contexts' share by
  ``exp((1/T − 1)·LSE)`` and drowns the attention sink.

Defaults T = 0.9 and S = 0.9; ``benchmarks/fidelity.py --ape-grid`` measures other choices.
From ``long_from`` prompt tokens on, ``long_temperature`` replaces T: the more parallel contexts
the query's attention spreads over, the sharper it must be to find one fact. On the long-context
needle test (``benchmarks/longctx.py``, Qwen2.5-Coder-0.5B) T = 0.5 kept 95 % of full prefill's
retrieval at 32K where T = 0.9 kept 60 %, but only 85–90 % at 16K, hence a length switch
rather than one value (an empirical setting, not from the paper).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ctxcache.engine.flops import prefill_flops
from ctxcache.engine.runner import ContextGroup, upload
from ctxcache.errors import InvalidInputError
from ctxcache.fusion.base import FusionContext, FusionResult, FusionStrategy, Segment
from ctxcache.fusion.chunks import Source, chunk_kv, full_flops, ids_array
from ctxcache.fusion.execute import execute
from ctxcache.fusion.selective import SelectivePlan
from ctxcache.kv.keys import chunk_key


class APE(FusionStrategy):
    name = "ape"

    def __init__(self, temperature: float = 0.9, scale: float = 0.9,
                 long_temperature: float | None = 0.5, long_from: int = 24000):
        if not 0.0 < temperature <= 4.0 or not 0.0 < scale <= 4.0 or \
                (long_temperature is not None and not 0.0 < long_temperature <= 4.0):
            raise InvalidInputError("APE temperature, long_temperature and scale must be in (0, 4]")
        if long_from < 0:
            raise InvalidInputError("APE long_from must be >= 0")
        self.temperature = temperature
        self.scale = scale
        self.long_temperature = long_temperature
        self.long_from = long_from

    def describe(self) -> dict:
        return {"name": self.name, "temperature": self.temperature, "scale": self.scale,
                "long_temperature": self.long_temperature, "long_from": self.long_from}

    def temperature_for(self, n: int) -> float:
        """T for a prompt of ``n`` tokens."""
        if self.long_temperature is not None and n >= self.long_from:
            return self.long_temperature
        return self.temperature

    def build(self, ctx: FusionContext, segments: Sequence[Segment]) -> FusionResult:
        engine = ctx.engine
        stats, timer, pieces, ids = self.start(ctx, segments, scale=self.scale)
        temperature = stats.extra["temperature"] = self.temperature_for(len(ids))
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
        sources: list[Source] = []
        positions = [np.arange(s)]
        built = 0
        with timer("lookup"):
            prefix_kv, prefix_key = None, None
            if prefix_ids:
                prefix_key, prefix_kv = chunk_kv(ctx, prefix_ids, stats)
                sources.append(Source(0, s, prefix_kv, 0))
            at, ctx_len = s, 0
            for p in contexts:
                cacheable = p.role == "chunk"
                before = stats.chunk_misses
                _, kv = chunk_kv(ctx, p.token_ids, stats, prefix=prefix_kv,
                                 prefix_key=prefix_key, store_new=cacheable)
                if not cacheable:  # glue text between contexts: encoded now, never stored
                    stats.chunk_misses = before
                    built += len(p.token_ids)
                n = len(p.token_ids)
                sources.append(Source(at, at + n, kv, 0))  # already at positions s..s+n-1
                positions.append(np.arange(s, s + n))
                at += n
                ctx_len = max(ctx_len, n)
        past = at
        q_first = s + ctx_len
        positions.append(np.arange(q_first, q_first + len(query_ids)))
        n_all = past + len(query_ids)
        group = ContextGroup(s, past, temperature, self.scale)
        pos = upload(np.concatenate(positions), torch.long, engine.device)
        rows = np.arange(past, n_all)
        ex = execute(ctx, ids_array(pieces), sources,
                     SelectivePlan(rows, np.ones(rows.size, dtype=bool)),
                     timer, positions=pos, context_group=group if contexts else None)
        out = ex.out
        n, L = len(ids), engine.spec.num_layers
        stats.prompt_tokens = n
        stats.reused_tokens = n - len(query_ids) - built
        stats.recomputed_tokens = len(query_ids) + built
        stats.computed_token_layers = (len(query_ids) + built) * L
        stats.total_token_layers = n * L
        stats.flops = prefill_flops(engine.spec, len(query_ids), past) + sum(
            prefill_flops(engine.spec, len(p.token_ids), s) for p in contexts if p.role != "chunk")
        stats.full_flops = full_flops(ctx, n)
        stats.extra["query_start_position"] = q_first
        return FusionResult(out.kv, out.logits, stats, context_group=group if contexts else None,
                            token_ids=ids, storage=ex.storage)

    @staticmethod
    def chunk_key_after(ctx: FusionContext, prefix_ids: list[int], ids: list[int]) -> str:
        """The cache key APE uses for a chunk encoded after ``prefix_ids`` (for pre-warming)."""
        fp = ctx.engine.fingerprint
        pk = chunk_key(fp, prefix_ids) if prefix_ids else None
        return chunk_key(fp, ids, pk)
