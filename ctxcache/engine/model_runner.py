"""One forward for every running sequence's next token: batched decode over the paged pool.

Each running sequence contributes one row (its last sampled token at its next position); the
rows run the layer loop together — one GEMM per projection for the whole batch instead of one
per sequence — and attention reads each row's keys through its block table
(``ops.paged_decode``: our paged split-K Triton kernel on CUDA, per-sequence SDPA on CPU, the
same computation as a contiguous batch-1 decode). The new row's K/V is written into its page
by the fused RoPE+scatter step.

On CUDA the loop is captured once per batch-size bucket as a CUDA graph and replayed: a decode
step is then a handful of host→device copies and one graph launch, not ~10 launches per layer.
Padding rows of a bucket write to the pool's scratch page and attend to nothing.

APE sequences keep their contexts' attention adjustment during decode: the paged kernel
takes each sequence's context range, temperature and scale (a batch mixing APE and other
sequences runs one launch; graphs are captured apart for batches with and without APE rows).
On the torch ops (CPU) APE rows run the reference two-group attention over gathered keys.
"""

from __future__ import annotations

import math

from dataclasses import dataclass

import torch
from torch import Tensor

from ctxcache.engine.kv_pool import PagedKVPool
from ctxcache.engine.types import ContextGroup

BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256)


@dataclass
class DecodeRow:
    token: int
    position: int
    slot: int  # pool slot the new row's K/V goes to
    blocks: list[int]  # the sequence's block table
    n_keys: int  # keys it attends to, its own new row included
    group: ContextGroup | None = None  # APE's adjustment (keys' positions in key_pos)
    key_pos: list[int] | None = None


class ModelRunner:
    def __init__(self, engine, pool: PagedKVPool, max_batch: int, max_model_len: int,
                 cuda_graphs: bool = True):
        self.engine = engine
        self.pool = pool
        self.max_batch = max_batch
        self.width = pool.blocks_for(max_model_len)  # block-table columns
        dev = engine.device
        self.cuda = dev.type == "cuda"
        self.graphs_on = bool(cuda_graphs and self.cuda and engine.ops.name == "triton")
        n = self._bucket(max_batch) if self.graphs_on else max_batch
        # static inputs (graph replays read them in place)
        self._ids = torch.zeros(n, dtype=torch.long, device=dev)
        self._pos = torch.zeros(n, dtype=torch.long, device=dev)
        self._slots = torch.zeros(n, dtype=torch.int32, device=dev)
        self._lens = torch.zeros(n, dtype=torch.int32, device=dev)
        self._tables = torch.zeros(n, self.width, dtype=torch.int32, device=dev)
        # APE: per-row context [start, end), temperature, log scale (start = end: none)
        self._cs = torch.zeros(n, dtype=torch.int32, device=dev)
        self._ce = torch.zeros(n, dtype=torch.int32, device=dev)
        self._temp = torch.ones(n, dtype=torch.float32, device=dev)
        self._logs = torch.zeros(n, dtype=torch.float32, device=dev)
        self._static = {"ids": self._ids, "pos": self._pos, "slots": self._slots,
                        "lens": self._lens, "tables": self._tables, "cs": self._cs,
                        "ce": self._ce, "temp": self._temp, "logs": self._logs}
        self._host_t = {k: torch.zeros_like(t, device="cpu", pin_memory=self.cuda)
                        for k, t in self._static.items()}
        self._host = {k: t.numpy() for k, t in self._host_t.items()}
        self._graphs: dict[int, tuple] = {}
        self._mempool = None
        self.graph_replays = 0

    @staticmethod
    def _bucket(n: int) -> int:
        for b in BUCKETS:
            if b >= n:
                return b
        return n

    # ------------------------------------------------------------------ the forward
    def _forward(self, ids: Tensor, pos: Tensor, slots: Tensor, tables: Tensor, lens: Tensor,
                 groups: tuple | None = None, slot_lists=None,
                 grouped: list | None = None) -> Tensor:
        e, pool = self.engine, self.pool
        b = ids.shape[0]
        pos32 = pos.to(torch.int32)
        h = e.embed(ids)
        resid = None
        for i in range(e.spec.num_layers):
            qkv = e.layer_in(i, h, resid)
            q, _, _ = e.rope_rows(qkv, pos, pos32, pool.k[i], pool.v[i], slots)
            qb = q.transpose(0, 1)  # [B, Hq, D]
            a = e.ops.paged_decode(qb, pool.k[i], pool.v[i], tables, lens, pool.block_size,
                                   e.scaling, slot_lists, groups)
            a = a.reshape(b, -1)
            for r, idx, kpos, group in grouped or ():
                a[r] = e.attend_grouped(q[:, r:r + 1], pool.k[i].index_select(1, idx),
                                        pool.v[i].index_select(1, idx), pos[r:r + 1], kpos,
                                        group)[0]
            resid = e.layer_out(i, h, a)
        return e.lm_head(e.final_hidden(h, resid)).float()

    def _fill(self, rows: list[DecodeRow], n: int, groups: bool) -> None:
        """Host → static input buffers: rows are written into persistent (pinned, on CUDA)
        host mirrors and copied in one transfer each. Reusing the host buffers is safe because
        every step ends by reading its sampled tokens back, after which its copies are done."""
        hs = self._host
        b = len(rows)
        for j, r in enumerate(rows):
            hs["ids"][j], hs["pos"][j], hs["slots"][j], hs["lens"][j] = (
                r.token, r.position, r.slot, r.n_keys)
            hs["tables"][j, :len(r.blocks)] = r.blocks
            if groups:
                g = r.group
                hs["cs"][j], hs["ce"][j] = (g.start, g.end) if g is not None else (0, 0)
                hs["temp"][j] = g.temperature if g is not None else 1.0
                hs["logs"][j] = math.log(g.scale) if g is not None else 0.0
        for k in ("ids", "pos", "slots", "lens", "cs", "ce", "logs"):
            hs[k][b:n] = 0  # padding rows: scratch slot 0, no keys
        hs["temp"][b:n] = 1.0
        keys = list(self._static) if groups else ["ids", "pos", "slots", "lens", "tables"]
        for k in keys:
            self._static[k][:n].copy_(self._host_t[k][:n], non_blocking=self.cuda)

    def _args(self, n: int, groups: bool) -> tuple:
        g = (self._cs[:n], self._ce[:n], self._temp[:n], self._logs[:n]) if groups else None
        return (self._ids[:n], self._pos[:n], self._slots[:n], self._tables[:n], self._lens[:n],
                g)

    @torch.inference_mode()
    def decode(self, rows: list[DecodeRow]) -> Tensor:
        """Logits [B, vocab] (float32) of each row's next token; writes each row's K/V."""
        b = len(rows)
        has_group = any(r.group is not None for r in rows)
        triton = self.engine.ops.name == "triton"
        if self.graphs_on and b <= self.max_batch:
            n = self._bucket(b)
            self._fill(rows, n, has_group)
            with self.engine.lock:
                g = self._graphs.get((n, has_group)) or self._capture(n, has_group)
                g[0].replay()
            self.graph_replays += 1
            return g[1][:b]
        self._fill(rows, b, has_group and triton)
        if triton:
            with self.engine.lock:
                return self._forward(*self._args(b, has_group))
        bs = self.pool.block_size
        dev = self.engine.device
        slot_lists, grouped = [], []
        for j, r in enumerate(rows):
            blk = torch.as_tensor(r.blocks[:-(-r.n_keys // bs)], dtype=torch.long)
            idx = (blk[:, None] * bs + torch.arange(bs)).reshape(-1)[:r.n_keys].to(dev)
            slot_lists.append(idx)
            if r.group is not None:
                kpos = torch.as_tensor(r.key_pos, dtype=torch.long, device=dev)
                grouped.append((j, idx, kpos, r.group))
        with self.engine.lock:
            return self._forward(*self._args(b, False), slot_lists, grouped)

    def _capture(self, n: int, groups: bool) -> tuple:
        """Warm up, then capture the decode loop for bucket ``n`` (inputs are the static
        buffers' first ``n`` rows), with or without APE's per-row context groups."""
        args = self._args(n, groups)
        s = torch.cuda.Stream(self.engine.device)
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                self._forward(*args)
        torch.cuda.current_stream().wait_stream(s)
        if self._mempool is None:
            self._mempool = torch.cuda.graph_pool_handle()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self._mempool):
            out = self._forward(*args)
        self._graphs[(n, groups)] = (g, out)
        return self._graphs[(n, groups)]

    def describe(self) -> dict:
        return {"cuda_graphs": self.graphs_on, "captured_buckets": sorted(n for n, _ in self._graphs),
                "graph_replays": self.graph_replays}
