"""Layer-wise selective recompute over a mixed (reused + recomputed) K/V — CacheBlend's core,
shared by CacheBlend, Cache-Craft and naive reuse.

Start from the assembled prompt K/V (cached spans re-positioned, text slots empty). The rows
given by the plan (e.g. every non-prefix token for CacheBlend, the text only for naive reuse)
run from layer 0. At a selection layer each row's fresh K/V is compared with the cached K/V
(the deviation cross-chunk attention causes) and only the most deviating rows — plus every row
that has no cache — go on; the rest keep their cached K/V in the upper layers. The remaining
rows' queries attend over the whole mixed K/V, causal by position.

Why a *plan*: how many rows survive each selection is fixed on the host before the loop starts
(a global top-k, or a top-k per chunk), so every tensor in the loop has a shape known in
advance. The loop then never reads a value back from the device — the GPU runs ahead of the
Python that launches it — and the whole loop can be captured as a CUDA graph (``graphs.py``).

With every row kept at every layer this is exactly full prefill; with none it is naive reuse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ctxcache.engine.flops import attention_flops, linear_flops_per_token
from ctxcache.engine.kvcache import KVCache
from ctxcache.engine.runner import ContextGroup, Engine, upload


@dataclass
class Selection:
    """After computing Q/K/V at ``layer``, keep ``keep`` rows: the must rows plus the most
    deviating others — globally, or per chunk when ``group_keep`` gives each chunk's count."""

    layer: int
    keep: int
    group_keep: list[int] | None = None


@dataclass
class SelectivePlan:
    rows: np.ndarray  # slots computed from layer 0, ascending (int)
    must: np.ndarray  # bool per row: never dropped (tokens without a cache)
    selections: list[Selection] = field(default_factory=list)
    groups: np.ndarray | None = None  # chunk index per row (−1 outside chunks)
    record: set[int] = field(default_factory=set)  # layers whose deviations are returned
    probe_layer: int | None = None  # layer whose attention probabilities are returned


@dataclass
class SelectiveOutput:
    kv: KVCache
    logits: Tensor  # [vocab] of the last token
    computed_token_layers: int
    flops: float
    recomputed: Tensor  # slots of the rows active in the last layer (device; may hold padding)
    probe_attention: Tensor | None = None  # [n_active, N] mean attention at the probe layer
    deviations: dict | None = None  # layer → (slots, deviation) at recorded layers


def ratio_schedule(r: float, layer: int, select_from: int, widen: float, narrow_layers: int
                   ) -> float:
    """Fraction of candidates kept after ``layer``: starts at min(1, r·widen) at the first
    selection layer and narrows linearly to r over ``narrow_layers`` layers (CacheBlend's
    gradual filtering: an early, noisier choice keeps a wider set)."""
    start = min(1.0, r * widen)
    if narrow_layers <= 1:
        return r
    step = min(max(layer - select_from, 0), narrow_layers - 1) / (narrow_layers - 1)
    return start + (r - start) * step


def keep_count(frac: float, n_candidates: int) -> int:
    return min(n_candidates, int(math.ceil(frac * n_candidates - 1e-9)))


def _select(dev: Tensor, must: Tensor, pad: Tensor | None, group: Tensor | None, keep: int,
            group_keep: Tensor | None) -> Tensor:
    """Row indices kept (ascending), a static number of them: ``keep``. Padding rows (CUDA-graph
    buckets) rank below every real row."""
    score = dev.masked_fill(must, float("inf"))
    if pad is not None:
        score = score.masked_fill(pad, float("-inf"))
    if group_keep is None:
        idx = torch.topk(score, keep, sorted=False).indices
    else:  # per-chunk top-k: rank rows within their chunk by deviation
        n = score.numel()
        order = torch.argsort(score, descending=True, stable=True)
        g = group[order]
        by_group = torch.argsort(g, stable=True)
        rows, g = order[by_group], g[by_group]
        rank = torch.arange(n, device=dev.device) - torch.searchsorted(g, g)
        kept = rank < group_keep[g + 1]
        idx = rows[torch.argsort((~kept).to(torch.uint8), stable=True)[:keep]]
    return torch.sort(idx).values


@dataclass
class LoopInputs:
    """Device tensors the layer loop reads: for one request (eager), or static buffers that a
    captured CUDA graph reads on every replay."""

    ids: Tensor  # token ids of the rows
    rows: Tensor  # slots of the rows (ascending)
    must: Tensor  # bool: never dropped
    group: Tensor  # chunk index per row
    pad: Tensor | None = None  # bool: padding rows of a graph bucket
    last_slot: Tensor | None = None  # slot of the prompt's last token (graph buckets)
    group_keep: dict = field(default_factory=dict)  # layer → per-chunk keep counts (+ must)


@dataclass
class LoopResult:
    logits: Tensor
    rows: Tensor
    probe: Tensor | None
    deviations: dict


def run_loop(engine: Engine, K: Tensor, V: Tensor, kpos: Tensor, inp: LoopInputs,
             plan: SelectivePlan, keeps: dict[int, int], ready: list | None = None,
             context_group: ContextGroup | None = None) -> LoopResult:
    """The layer loop itself: device work only, every shape fixed by ``keeps`` (layer → rows
    kept) — no host read-back, so it can be captured as a CUDA graph."""
    L = engine.spec.num_layers
    ops = engine.ops
    d = engine.spec.head_dim
    group_size = engine.spec.num_heads // engine.spec.num_kv_heads
    rows, must, group, pad = inp.rows, inp.must, inp.group, inp.pad
    n = rows.numel()
    probe, deviations = None, {}
    pos = kpos[rows]
    pos32, rows32 = pos.to(torch.int32), rows.to(torch.int32)
    attn_plan = (ops.plan(pos, kpos, d, True, group_size, engine.scaling)
                 if context_group is None else engine.group_plan(pos, kpos, context_group))
    h = engine.embed(inp.ids)
    resid = None
    for layer in range(L):
        if ready is not None:  # this layer's cached K/V must have arrived
            torch.cuda.current_stream().wait_event(ready[layer])
        qkv = engine.layer_in(layer, h, resid)
        keep_n = keeps.get(layer)
        if keep_n is None and layer not in plan.record:
            q, _, _ = engine.rope_rows(qkv, pos, pos32, K[layer], V[layer], rows32)
        else:
            q, k, v = engine.rope_rows(qkv, pos, pos32)
            dev = ops.kv_deviation_at(k, v, K[layer], V[layer], rows32)
            if layer in plan.record:
                deviations[layer] = (rows, dev)
            if keep_n is not None and keep_n < n:
                keep = _select(dev, must, pad, group, keep_n, inp.group_keep.get(layer))
                n = keep_n
                rows, must, group, h = rows[keep], must[keep], group[keep], h[keep]
                pad = pad[keep] if pad is not None else None
                q, k, v = q[:, keep], k[:, keep], v[:, keep]
                pos = kpos[rows]
                pos32, rows32 = pos.to(torch.int32), rows.to(torch.int32)
                attn_plan = ops.plan(pos, kpos, d, True, group_size, engine.scaling)
            ops.scatter_kv(K[layer], V[layer], rows, k, v)
        if plan.probe_layer == layer:
            probe = _attention_probs(engine, q, K[layer], kpos[None, :] <= pos[:, None])
        if context_group is not None:
            a = engine.attend_grouped(q, K[layer], V[layer], pos, kpos, context_group, attn_plan)
        else:
            a = ops.selective_attention(q, K[layer], V[layer], pos, kpos, engine.scaling,
                                        k_sorted=True, plan=attn_plan)
            a = a.transpose(0, 1).reshape(n, -1)
        resid = engine.layer_out(layer, h, a)
    # rows stay in slot order and the prompt's last token is always computed: the last real row
    if inp.last_slot is None:
        last = slice(n - 1, n)
        hl, rl = h[last], resid[last]
    else:
        at = torch.searchsorted(rows, inp.last_slot)
        hl, rl = h.index_select(0, at), resid.index_select(0, at)
    logits = engine.lm_head(engine.final_hidden(hl, rl)).float()[0]
    return LoopResult(logits, rows, probe, deviations)


def upload_inputs(engine: Engine, ids: list[int], plan: SelectivePlan) -> LoopInputs:
    """The rows' token ids, slots, flags and per-chunk budgets in one host→device copy."""
    n0 = len(plan.rows)
    groups = plan.groups if plan.groups is not None else np.full(n0, -1)
    parts = [np.asarray(ids, dtype=np.int64)[plan.rows], plan.rows, plan.must.astype(np.int64),
             groups]
    for s in plan.selections:  # per-chunk budgets travel in the same upload
        if s.group_keep is not None:
            parts += [[np.iinfo(np.int64).max // 2], s.group_keep]
    buf = upload(np.concatenate(parts), torch.int64, engine.device)
    inp = LoopInputs(buf[:n0], buf[n0:2 * n0], buf[2 * n0:3 * n0].bool(), buf[3 * n0:4 * n0])
    off = 4 * n0
    for s in plan.selections:
        if s.group_keep is not None:
            inp.group_keep[s.layer] = buf[off:off + len(s.group_keep) + 1]
            off += len(s.group_keep) + 1
    return inp


def loop_flops(engine: Engine, plan: SelectivePlan) -> tuple[float, int]:
    """(FLOPs, token-layers computed) of a plan, from its host-known row counts. Attention
    assumes each stage's rows see the mean number of keys of the first stage (an estimate:
    which rows survive a selection is only known on the device)."""
    L = engine.spec.num_layers
    lin = linear_flops_per_token(engine.spec) / L
    qkv_share = _qkv_share(engine)
    n = len(plan.rows)
    kavg = float(np.mean(plan.rows)) + 1.0 if n else 0.0
    keeps = {s.layer: s.keep for s in plan.selections}
    flops, computed = 0.0, 0
    for layer in range(L):
        keep = keeps.get(layer)
        if keep is not None and keep < n:
            flops += lin * qkv_share * (n - keep)  # Q/K/V of the rows dropped here
            n = keep
        computed += n
        flops += lin * n + attention_flops(engine.spec, n, kavg) / L
    return flops, computed


@torch.inference_mode()
def selective_prefill(engine: Engine, ids: list[int], kv: KVCache, plan: SelectivePlan,
                      ready: list | None = None, context_group: ContextGroup | None = None
                      ) -> SelectiveOutput:
    """Run the layer loop over ``plan.rows``, narrowing at the plan's selections.

    ``kv`` is the assembled prompt K/V, updated in place (the caller owns it); ``ready`` are
    per-layer CUDA events of K/V still being loaded (``chunks.assemble``). With
    ``context_group`` (APE) the rows attend with APE's adjustment on the contexts; keys need
    not be position-sorted then.
    """
    inp = upload_inputs(engine, ids, plan)
    keeps = {s.layer: s.keep for s in plan.selections}
    with engine.lock:
        res = run_loop(engine, kv.k, kv.v, kv.positions, inp, plan, keeps, ready, context_group)
    flops, computed = loop_flops(engine, plan)
    return SelectiveOutput(KVCache(kv.k, kv.v, kv.positions), res.logits, computed, flops,
                           res.rows, res.probe, res.deviations)


def _qkv_share(engine: Engine) -> float:
    s = engine.spec
    h, d = s.hidden_size, s.head_dim
    qkv = h * (s.num_heads + 2 * s.num_kv_heads) * d
    total = qkv + h * s.num_heads * d + 3 * h * s.intermediate_size
    return qkv / total


def _attention_probs(engine: Engine, q: Tensor, k: Tensor, mask: Tensor) -> Tensor:
    """Head-averaged attention probabilities [Tq, Tk] (explicit: used for statistics only)."""
    hq, hkv = q.shape[0], k.shape[0]
    kk = k.repeat_interleave(hq // hkv, dim=0) if hq != hkv else k
    scores = torch.einsum("htd,hsd->hts", q.float(), kk.float()) * engine.scaling
    scores = scores.masked_fill(~mask[None], float("-inf"))
    return torch.softmax(scores, dim=-1).mean(dim=0)
