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
    recomputed: Tensor  # slots of the rows active in the last layer (device)
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


def _select(dev: Tensor, must: Tensor, group: Tensor | None, sel: Selection,
            group_keep: Tensor | None) -> Tensor:
    """Row indices kept (ascending), a static number of them: ``sel.keep``."""
    score = dev.masked_fill(must, float("inf"))
    if group_keep is None:
        keep = torch.topk(score, sel.keep, sorted=False).indices
    else:  # per-chunk top-k: rank rows within their chunk by deviation
        n = score.numel()
        order = torch.argsort(score, descending=True, stable=True)
        g = group[order]
        by_group = torch.argsort(g, stable=True)
        rows, g = order[by_group], g[by_group]
        rank = torch.arange(n, device=dev.device) - torch.searchsorted(g, g)
        kept = rank < group_keep[g + 1]
        keep = rows[torch.argsort((~kept).to(torch.uint8), stable=True)[:sel.keep]]
    return torch.sort(keep).values


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
    L = engine.spec.num_layers
    ops = engine.ops
    d = engine.spec.head_dim
    group_size = engine.spec.num_heads // engine.spec.num_kv_heads
    K, V = kv.k, kv.v
    kpos = kv.positions
    n0 = len(plan.rows)
    groups = plan.groups if plan.groups is not None else np.full(n0, -1)
    host = np.concatenate([np.asarray(ids, dtype=np.int64)[plan.rows], plan.rows,
                           plan.must.astype(np.int64), groups])
    for s in plan.selections:  # per-chunk budgets travel in the same upload
        if s.group_keep is not None:
            host = np.concatenate([host, [np.iinfo(np.int64).max // 2], s.group_keep])
    buf = upload(host, torch.int64, engine.device)
    ids0, rows = buf[:n0], buf[n0:2 * n0]
    must, group = buf[2 * n0:3 * n0].bool(), buf[3 * n0:4 * n0]
    sel_by_layer, gk, off = {}, {}, 4 * n0
    for s in plan.selections:
        sel_by_layer[s.layer] = s
        if s.group_keep is not None:
            gk[s.layer] = buf[off:off + len(s.group_keep) + 1]
            off += len(s.group_keep) + 1
    lin = linear_flops_per_token(engine.spec) / L
    qkv_share = _qkv_share(engine)
    kavg = float(np.mean(plan.rows)) + 1.0 if n0 else 0.0  # mean keys a query sees (estimate)
    flops, computed, n = 0.0, 0, n0
    probe, deviations = None, {}
    with engine.lock:
        pos = kpos[rows]
        pos32, rows32 = pos.to(torch.int32), rows.to(torch.int32)
        attn_plan = (ops.plan(pos, kpos, d, True, group_size, engine.scaling)
                     if context_group is None else engine.group_plan(pos, kpos, context_group))
        h = engine.embed(ids0)
        resid = None
        for layer in range(L):
            if ready is not None:  # this layer's cached K/V must have arrived
                torch.cuda.current_stream().wait_event(ready[layer])
            qkv = engine.layer_in(layer, h, resid)
            sel = sel_by_layer.get(layer)
            if sel is None and layer not in plan.record:
                q, _, _ = engine.rope_rows(qkv, pos, pos32, K[layer], V[layer], rows32)
            else:
                q, k, v = engine.rope_rows(qkv, pos, pos32)
                dev = ops.kv_deviation_at(k, v, K[layer], V[layer], rows32)
                if layer in plan.record:
                    deviations[layer] = (rows, dev)
                if sel is not None and sel.keep < n:
                    keep = _select(dev, must, group, sel, gk.get(layer))
                    flops += lin * qkv_share * (n - sel.keep)  # Q/K/V of the dropped rows
                    n = sel.keep
                    rows, must, group, h = rows[keep], must[keep], group[keep], h[keep]
                    q, k, v = q[:, keep], k[:, keep], v[:, keep]
                    pos = kpos[rows]
                    pos32, rows32 = pos.to(torch.int32), rows.to(torch.int32)
                    attn_plan = ops.plan(pos, kpos, d, True, group_size, engine.scaling)
                ops.scatter_kv(K[layer], V[layer], rows, k, v)
            if plan.probe_layer == layer:
                probe = _attention_probs(engine, q, K[layer], kpos[None, :] <= pos[:, None])
            if context_group is not None:
                a = engine.attend_grouped(q, K[layer], V[layer], pos, kpos, context_group,
                                          attn_plan)
            else:
                a = ops.selective_attention(q, K[layer], V[layer], pos, kpos, engine.scaling,
                                            k_sorted=True, plan=attn_plan)
                a = a.transpose(0, 1).reshape(n, -1)
            resid = engine.layer_out(layer, h, a)
            computed += n
            flops += lin * n + attention_flops(engine.spec, n, kavg) / L
        # rows stay in slot order and the prompt's last token is always computed: last row
        logits = engine.lm_head(engine.final_hidden(h[-1:], resid[-1:])).float()[0]
    return SelectiveOutput(KVCache(K, V, kpos), logits, computed, flops, rows, probe,
                           deviations)


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
