"""Running a reuse plan: assembly + layer loop, through a CUDA graph where one applies.

Every selective strategy (naive, CacheBlend, Cache-Craft, prefix, APE) ends the same way: the
cached spans and a ``SelectivePlan`` go in, the prompt's K/V (with room for the answer) and the
last token's logits come out. On CUDA with the Triton ops, plans whose shapes repeat replay a
captured graph (``graphs.py``); everything else runs the same loop eagerly — except an exact
*tail* (the cached spans cover the prompt's first tokens, every later row is computed, no
selection: prefix reuse), which runs as the engine's own prefill of the new tokens over the
cached ones. That is the cheapest eager way to the same K/V (the selective loop's extra
launches per layer cost more than the work for a few hundred rows).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from ctxcache.engine.kvcache import KVCache
from ctxcache.engine.runner import ContextGroup
from ctxcache.fusion.chunks import Source, assemble, with_room
from ctxcache.fusion.graphs import LoopGraphs, loop_graphs
from ctxcache.fusion.selective import (
    SelectiveOutput, SelectivePlan, loop_flops, selective_prefill,
)
from ctxcache.fusion.types import FusionContext, Timer


@dataclass
class Executed:
    out: SelectiveOutput
    storage: KVCache  # the buffer holding ``out.kv`` with room for the answer
    graph: bool  # replayed or captured a CUDA graph


def execute(ctx: FusionContext, ids: list[int], sources: list[Source], plan: SelectivePlan,
            timer: Timer, positions: Tensor | None = None,
            context_group: ContextGroup | None = None) -> Executed:
    engine = ctx.engine
    graphs = loop_graphs(engine)
    if graphs is not None and positions is None and LoopGraphs.eligible(
            engine, sources, plan, context_group):
        with timer("layers"):
            done = graphs.run(ctx, ids, sources, plan)
        if done is not None:
            return Executed(done[0], done[1], True)
    n_past = _exact_tail(len(ids), sources, plan, positions, context_group)
    if n_past is not None:
        return _tail_prefill(ctx, ids, sources, plan, n_past, timer)
    with timer("assembly"):
        asm = assemble(ctx, len(ids), sources, positions)
    with timer("layers"):
        out = selective_prefill(engine, ids, asm.kv, plan, asm.ready, context_group)
    return Executed(out, asm.storage, False)


def _exact_tail(n: int, sources: list[Source], plan: SelectivePlan,
                positions: Tensor | None, context_group: ContextGroup | None) -> int | None:
    """The number of leading cached rows when the plan is an exact tail, else None."""
    if positions is not None or context_group is not None or plan.selections or \
            plan.record or plan.probe_layer is not None:
        return None
    n_past = 0
    for s in sources:  # contiguous from 0, at their own positions
        if s.start != n_past or s.delta:
            return None
        n_past = s.end
    rows = plan.rows
    if n_past >= n or len(rows) != n - n_past or int(rows[0]) != n_past or \
            int(rows[-1]) != n - 1:
        return None
    return n_past


def _tail_prefill(ctx: FusionContext, ids, sources: list[Source], plan: SelectivePlan,
                  n_past: int, timer: Timer) -> Executed:
    engine = ctx.engine
    n = len(ids)
    with timer("assembly"):  # the cached rows in one buffer with room for the new ones
        asm = assemble(replace(ctx, reserve_tokens=n - n_past + max(0, ctx.reserve_tokens)),
                       n_past, sources) if n_past else None
    with timer("layers"):
        past = asm.kv if asm is not None else None
        for ev in (asm.ready or []) if asm is not None else []:
            torch.cuda.current_stream().wait_event(ev)  # host spans still on their way
        out = engine.prefill(np.asarray(ids[n_past:], dtype=np.int64).tolist(), kv=past)
        if asm is not None:
            storage = asm.storage
            storage.k[:, :, n_past:n].copy_(out.kv.k)
            storage.v[:, :, n_past:n].copy_(out.kv.v)
        else:
            storage = out.kv if ctx.reserve_tokens <= 0 else with_room(
                engine, out.kv.k, out.kv.v, ctx.reserve_tokens)
    flops, computed = loop_flops(engine, plan)
    kv = storage.slice(0, n)
    rows = torch.arange(n_past, n, device=engine.device)
    return Executed(SelectiveOutput(kv, out.logits[-1], computed, flops, rows), storage, False)


def graph_stats(engine) -> dict:
    g = getattr(engine, "_loop_graphs", None)
    return g.describe() if g is not None else {}


