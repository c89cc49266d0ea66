"""CUDA graphs of the reuse path's layer loop.

The selective loop launches about ten kernels per layer; for a small model the host needs more
time to launch them than the GPU needs to run them, so the loop is bound by Python and the
launch path, not by work. A captured CUDA graph replays the whole loop with one launch.

A graph fixes every shape and address, so prompts are grouped into **buckets**: the prompt
length is rounded up (≤ 1/16 extra, at least one spare slot) and so are the number of rows
computed from layer 0 and the rows kept after each selection. Padding is inert by
construction: padded key slots hold zeros at position 2³⁰ (no real query sees them), padded
rows write only to the bucket's last slot (its "trash" slot, also at 2³⁰) and rank below every
real row at a selection; the prompt's last token is found by its slot. A bucket may keep a few
more rows than asked (never fewer), so its result is at least as close to full prefill.

Each bucket owns a static K/V buffer the chunks are assembled into; after a replay the prompt's
K/V is copied out (with room for the answer) so the next request can reuse the buffer. Graphs
share one memory pool and are captured only for shapes seen ``min_uses`` times; the least
recently used ones are dropped beyond ``max_graphs`` or ``max_bytes`` of static buffers.

A capture costs tens of milliseconds (one eager run to warm every kernel, then the capture), so
a request that triggers one waits far longer than its eager loop. Under the serving engine
(``defer``) no request captures: a new shape runs eagerly and is queued, and the engine
captures queued shapes while it has nothing else to do (``capture_pending``, one per idle
turn), so the next request of that shape replays. For exact tails (prefix reuse: no selection)
the neighbouring shapes are queued behind it, synthesised — the next two prompt-length buckets
(a conversation grows) by this row bucket and the ones on either side — so an agent's next
step usually finds its graph already captured.
"""

from __future__ import annotations

import os
from collections import Counter, OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ctxcache.engine.kvcache import KVCache
from ctxcache.engine.runner import Engine, upload
from ctxcache.fusion.chunks import (
    Source, _assemble_triton, device_resident, readable_in_place, with_room,
)
from ctxcache.fusion.selective import (
    LoopInputs, LoopResult, SelectiveOutput, SelectivePlan, loop_flops, run_loop,
)
from ctxcache.fusion.types import FusionContext

FAR = 1 << 30  # position of padded slots: after every real position
SMALL_KV_BYTES = 64 << 10  # K/V per token under which host chunks load before a graph replay


def bucket(n: int, floor: int = 64, rel: int = 16) -> int:
    """``n`` rounded up to a multiple of max(floor, 2^⌈log2 n⌉ / rel)."""
    step = max(floor, (1 << max(n - 1, 1).bit_length()) // rel)
    return -(-n // step) * step


@dataclass
class _Static:
    K: Tensor  # [L, H, Nb, D]
    V: Tensor
    nbytes: int


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: LoopInputs
    kpos: Tensor
    out: LoopResult
    static: _Static


class LoopGraphs:
    def __init__(self, engine: Engine, max_graphs: int = 128, max_bytes: int | None = None,
                 min_uses: int = 2, max_pending: int = 32):
        self.engine = engine
        # captures only in capture_pending (a serving engine's idle time): True while a
        # serving engine over this engine is open (each holds one count), or when set
        self.deferrers = 0
        self._defer = False
        self.max_pending = max_pending
        self.pending: OrderedDict[tuple, tuple] = OrderedDict()  # key → (ids, plan, keeps)
        self.max_graphs = max_graphs
        if max_bytes is None:
            max_bytes = int(0.15 * torch.cuda.get_device_properties(engine.device).total_memory)
        self.max_bytes = max_bytes
        self.min_uses = min_uses
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self.statics: dict[int, _Static] = {}
        self.seen: Counter = Counter()
        self.stats = Counter()

    @property
    def defer(self) -> bool:
        return self._defer or self.deferrers > 0

    @defer.setter
    def defer(self, on: bool) -> None:
        self._defer = on

    # ------------------------------------------------------------------ policy
    @staticmethod
    def eligible(engine: Engine, sources, plan: SelectivePlan, context_group) -> bool:
        """Plans whose shapes a graph can fix. Chunks in host memory qualify when the model's
        K/V per token is small: loading them before the loop then costs less than the launch
        overhead a graph removes; for large K/V the eager loop overlaps the load layer by
        layer instead."""
        if not (engine.device.type == "cuda" and engine.ops.assemble_kv is not None
                and context_group is None and plan.probe_layer is None and not plan.record
                and all(s.group_keep is None for s in plan.selections)):
            return False
        if device_resident(engine, sources):
            return True
        small = engine.spec.kv_bytes_per_token(engine.dtype) <= SMALL_KV_BYTES
        return small and readable_in_place(engine, sources)

    def _shape(self, n: int, plan: SelectivePlan) -> tuple[int, int, dict[int, int]]:
        nb = bucket(n + 1, 256)
        prev = n0b = bucket(max(len(plan.rows), 1))
        keeps = {}
        for s in sorted(plan.selections, key=lambda s: s.layer):
            kb = min(bucket(max(s.keep, 1)), prev)
            keeps[s.layer] = kb
            prev = kb
        return nb, n0b, keeps

    def _static(self, nb: int) -> _Static:
        st = self.statics.get(nb)
        if st is None:
            s, e = self.engine.spec, self.engine
            K = torch.zeros(s.num_layers, s.num_kv_heads, nb, s.head_dim, dtype=e.dtype,
                            device=e.device)
            st = self.statics[nb] = _Static(K, torch.zeros_like(K), 2 * K.numel() *
                                            K.element_size())
        return st

    def _evict(self) -> None:
        used = sum(st.nbytes for st in self.statics.values())
        while self.graphs and (len(self.graphs) > self.max_graphs or used > self.max_bytes):
            _, g = self.graphs.popitem(last=False)
            self.stats["evicted"] += 1
            if not any(o.static is g.static for o in self.graphs.values()):
                self.statics = {k: v for k, v in self.statics.items() if v is not g.static}
                used -= g.static.nbytes

    # ------------------------------------------------------------------ run
    @torch.inference_mode()
    def run(self, ctx: FusionContext, ids: list[int], sources: list[Source],
            plan: SelectivePlan) -> tuple[SelectiveOutput, KVCache] | None:
        """The loop through a graph of its bucket, or None (then the caller runs it eagerly)."""
        engine = self.engine
        n = len(ids)
        nb, n0b, keeps = self._shape(n, plan)
        key = (nb, n0b, tuple(sorted(keeps.items())))
        g = self.graphs.get(key)
        if g is None:
            self.seen[key] += 1
            if self.defer:  # run eagerly now, capture when the engine is idle
                if key not in self.pending and self.seen[key] > 0:
                    self.pending[key] = (np.asarray(ids, dtype=np.int64).copy(), plan, keeps)
                    while len(self.pending) > self.max_pending:
                        self.pending.popitem(last=False)
                self.stats["eager"] += 1
                return None
            if self.seen[key] < self.min_uses:
                self.stats["eager"] += 1
                return None
        with engine.lock:
            static = g.static if g is not None else self._static(nb)
            _assemble_triton(engine, static.K, static.V, n, sources, n_slots=nb,
                             layerwise=False)
            host = self._host_inputs(ids, plan, n, nb, n0b)
            staged = upload(host, torch.int64, engine.device)
            if g is None:
                res = self._capture(key, static, staged, plan, keeps, n0b, nb)
            else:
                self._fill(g, staged, n0b, nb)
                g.graph.replay()
                self.graphs.move_to_end(key)
                self.stats["replays"] += 1
                res = g.out
            logits = res.logits.clone()
            storage = with_room(engine, static.K[:, :, :n], static.V[:, :, :n],
                                ctx.reserve_tokens)
        flops, computed = loop_flops(engine, plan)
        out = SelectiveOutput(storage.slice(0, n), logits, computed, flops, res.rows.clone())
        return out, storage

    @staticmethod
    def _host_inputs(ids, plan: SelectivePlan, n: int, nb: int, n0b: int) -> np.ndarray:
        n0 = len(plan.rows)
        pad = n0b - n0
        rows = np.concatenate([plan.rows, np.full(pad, nb - 1)])
        tok = np.concatenate([np.asarray(ids, dtype=np.int64)[plan.rows], np.zeros(pad)])
        must = np.concatenate([plan.must, np.zeros(pad, dtype=bool)])
        padm = np.concatenate([np.zeros(n0, dtype=bool), np.ones(pad, dtype=bool)])
        kpos = np.concatenate([np.arange(n), np.full(nb - n, FAR)])
        return np.concatenate([tok, rows, must, padm, kpos, [n - 1]]).astype(np.int64)

    @staticmethod
    def _fill(g: _Graph, staged: Tensor, n0b: int, nb: int) -> None:
        i = g.inputs
        i.ids.copy_(staged[:n0b])
        i.rows.copy_(staged[n0b:2 * n0b])
        i.must.copy_(staged[2 * n0b:3 * n0b].bool())
        i.pad.copy_(staged[3 * n0b:4 * n0b].bool())
        g.kpos.copy_(staged[4 * n0b:4 * n0b + nb])
        i.last_slot.copy_(staged[4 * n0b + nb:])

    def _capture(self, key, static: _Static, staged: Tensor, plan: SelectivePlan,
                 keeps: dict[int, int], n0b: int, nb: int) -> LoopResult:
        """Run this request eagerly on fresh static inputs (it also warms up every kernel),
        then capture the loop on them; replays of later requests refill the inputs."""
        engine = self.engine
        inputs = LoopInputs(staged[:n0b].clone(), staged[n0b:2 * n0b].clone(),
                            staged[2 * n0b:3 * n0b].bool(), torch.full((n0b,), -1,
                                                                      device=engine.device),
                            staged[3 * n0b:4 * n0b].bool(), staged[4 * n0b + nb:].clone())
        kpos = staged[4 * n0b:4 * n0b + nb].clone()
        res = run_loop(engine, static.K, static.V, kpos, inputs, plan, keeps)
        logits = res.logits.clone()
        rows = res.rows.clone()
        # the eager run changed the static K/V (recomputed rows); capture records, does not run
        graph = torch.cuda.CUDAGraph()
        torch.cuda.current_stream().synchronize()
        try:
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                out = run_loop(engine, static.K, static.V, kpos, inputs, plan, keeps)
        except RuntimeError:  # a kernel that cannot be captured here: stay eager for this shape
            self.stats["capture_failed"] += 1
            self.seen[key] = -(1 << 30)
            return LoopResult(logits, rows, None, {})
        self.graphs[key] = _Graph(graph, inputs, kpos, out, static)
        self.stats["captures"] += 1
        self._evict()
        return LoopResult(logits, rows, None, {})

    @torch.inference_mode()
    def capture_pending(self) -> bool:
        """Capture the oldest queued shape on the inputs of the request that brought it (the
        static K/V holds whatever the last replay left: the capture's warm-up run only writes
        its own rows, and every replay assembles its prompt first). False when none is queued."""
        if not self.pending:
            return False
        key, (ids, plan, keeps) = self.pending.popitem(last=False)
        if key in self.graphs:
            return True
        nb, n0b, _ = key
        if ids is not None and not plan.selections:  # real shape: queue its likely successors
            next1 = bucket(nb + 1, 256)
            for nb2 in (next1, bucket(next1 + 1, 256)):
                # the new rows vary from step to step: this row bucket and its neighbours
                for r in (bucket(max(1, n0b - max(64, n0b // 8))), n0b, bucket(n0b + 1)):
                    k2 = (nb2, r, ())
                    if r < nb2 - 1 and k2 not in self.graphs and k2 not in self.pending and \
                            self.seen[k2] >= 0:
                        self.pending[k2] = (None, None, {})
            while len(self.pending) > self.max_pending:
                self.pending.popitem(last=False)
        if ids is None:  # a synthesised tail: the bucket's longest prompt, its last r rows
            n = nb - 1
            rows = np.arange(n - n0b, n)
            plan = SelectivePlan(rows, np.ones(n0b, dtype=bool))
            ids = np.zeros(n, dtype=np.int64)
        with self.engine.lock:
            static = self._static(nb)
            staged = upload(self._host_inputs(ids, plan, len(ids), nb, n0b), torch.int64,
                            self.engine.device)
            self._capture(key, static, staged, plan, keeps, n0b, nb)
            torch.cuda.current_stream().synchronize()
        self.stats["idle_captures"] += 1
        return True

    def describe(self) -> dict:
        return {"graphs": len(self.graphs), "pending": len(self.pending), "static_bytes": sum(
            s.nbytes for s in self.statics.values()), **self.stats}


def loop_graphs(engine: Engine) -> LoopGraphs | None:
    """The engine's graph cache (created on first use), or None where graphs do not apply:
    CPU, the torch ops, or ``CTXCACHE_CUDA_GRAPHS=0``."""
    if engine.device.type != "cuda" or engine.ops.assemble_kv is None:
        return None
    if os.environ.get("CTXCACHE_CUDA_GRAPHS", "1") in ("0", "false", "off"):
        return None
    g = getattr(engine, "_loop_graphs", None)
    if g is None:
        g = engine._loop_graphs = LoopGraphs(engine)
    return g
