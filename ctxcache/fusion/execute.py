"""Running a reuse plan: assembly + layer loop, through a CUDA graph where one applies.

Every selective strategy (naive, CacheBlend, Cache-Craft, prefix, APE) ends the same way: the
cached spans and a ``SelectivePlan`` go in, the prompt's K/V (with room for the answer) and the
last token's logits come out. On CUDA with the Triton ops, plans whose shapes repeat replay a
captured graph (``graphs.py``); everything else runs the same loop eagerly.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ctxcache.engine.kvcache import KVCache
from ctxcache.engine.runner import ContextGroup
from ctxcache.fusion.chunks import Source, assemble
from ctxcache.fusion.graphs import LoopGraphs, loop_graphs
from ctxcache.fusion.selective import SelectiveOutput, SelectivePlan, selective_prefill
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
    with timer("assembly"):
        asm = assemble(ctx, len(ids), sources, positions)
    with timer("layers"):
        out = selective_prefill(engine, ids, asm.kv, plan, asm.ready, context_group)
    return Executed(out, asm.storage, False)


def graph_stats(engine) -> dict:
    g = getattr(engine, "_loop_graphs", None)
    return g.describe() if g is not None else {}


