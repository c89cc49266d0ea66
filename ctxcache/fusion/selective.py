"""Layer-wise selective recompute over a mixed (reused + recomputed) K/V — CacheBlend's core.

Start from the assembled prompt K/V (cached chunks re-positioned, placeholders for text). Layer 0
is computed for every non-prefix token (its K/V depends only on token and position, so this
costs one layer and gives every token a correct hidden state). From ``select_from`` on, each
selection layer computes Q/K/V for the tokens still active, measures how far their fresh K/V is
from the cached K/V (the deviation that cross-chunk attention causes), and keeps only the most
deviating ones — plus every token that has no cache — for attention and MLP. Tokens that dropped
out keep their cached K/V in the upper layers; the active ones overwrite theirs, and the queries
of the active tokens attend over the whole mixed K/V, causal by position.

With every token kept this is exactly full prefill; with none kept it is the naive reuse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ctxcache.engine.flops import attention_flops, linear_flops_per_token
from ctxcache.engine.kvcache import KVCache
from ctxcache.engine.runner import Engine

# selector(layer, active global indices, deviation per active token) -> bool keep-mask
Selector = Callable[[int, Tensor, Tensor], Tensor]


@dataclass
class SelectiveOutput:
    kv: KVCache
    logits: Tensor  # [vocab] of the last token
    computed_token_layers: int
    flops: float
    recomputed: Tensor  # global indices active in the last layer
    probe_attention: Tensor | None = None  # [n_active, N] mean attention at the probe layer
    deviations: dict | None = None  # layer → (global indices, deviation) at selection layers


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


def top_fraction(dev: Tensor, must: Tensor, frac: float, n_candidates: int) -> Tensor:
    """Keep ``must`` tokens plus the top ``frac × n_candidates`` others by deviation."""
    keep = must.clone()
    k = int(math.ceil(frac * n_candidates - 1e-9))
    k = min(k, int((~must).sum()))
    if k > 0:
        d = dev.masked_fill(must, float("-inf"))
        keep[torch.topk(d, k).indices] = True
    return keep


@torch.inference_mode()
def selective_prefill(
    engine: Engine,
    ids: Tensor,
    kv: KVCache,
    cached: Tensor,
    exact: Tensor,
    selector: Selector,
    select_layers: set[int],
    probe_layer: int | None = None,
    inplace: bool = False,
    start: Tensor | None = None,
    ready: list | None = None,
) -> SelectiveOutput:
    """Run the layer loop over the non-exact tokens, narrowing at ``select_layers``.

    ``cached`` marks tokens whose K/V came from a cache (candidates for reuse), ``exact`` the
    ones whose cached K/V is already exact (a prefix at its own positions): never recomputed.
    ``inplace`` lets the call write into ``kv``'s buffers (when the caller owns them);
    ``start`` overrides the tokens computed from layer 0 on (naive reuse: the text only);
    ``ready`` are per-layer CUDA events of K/V still being loaded (``chunks.assemble``).
    """
    L = engine.spec.num_layers
    ops = engine.ops
    K, V = (kv.k, kv.v) if inplace else (kv.k.clone(), kv.v.clone())
    pos = kv.positions.to(engine.device)
    active = torch.nonzero(~exact if start is None else start).flatten()
    must = ~cached[active]
    lin = linear_flops_per_token(engine.spec) / L
    qkv_share = _qkv_share(engine)
    flops = 0.0
    computed = 0
    probe = None
    deviations = {}
    k_sorted = bool(torch.all(pos[1:] >= pos[:-1])) if pos.numel() > 1 else True
    d = engine.spec.head_dim
    group = engine.spec.num_heads // engine.spec.num_kv_heads
    with engine.lock:
        h = engine.embed(ids[active])
        q_pos = pos[active]
        plan = ops.plan(q_pos, pos, d, k_sorted, group)  # recomputed only when the active set changes
        # mean number of keys a query sees (causal), for FLOP accounting; read from the GPU only
        # when the active set changes so the layer loop never waits on the device
        kavg = float(q_pos.float().mean()) + 1.0 if active.numel() else 0.0
        for layer in range(L):
            if ready is not None:  # this layer's cached K/V must have arrived
                torch.cuda.current_stream().wait_event(ready[layer])
            q, k, v = engine.qkv(layer, h, pos[active])
            if layer in select_layers:
                dev = ops.kv_deviation(k, v, K[layer][:, active], V[layer][:, active])
                dev = dev.masked_fill(must, float("inf"))
                deviations[layer] = (active, dev)
                keep = selector(layer, active, dev)
                n_keep = int(keep.sum())
                # the Q/K/V probe of the tokens dropped here is a partial layer of work
                flops += lin * qkv_share * (keep.numel() - n_keep)
                if n_keep != keep.numel():
                    active, must = active[keep], must[keep]
                    q, k, v, h = q[:, keep], k[:, keep], v[:, keep], h[keep]
                    q_pos = pos[active]
                    plan = ops.plan(q_pos, pos, d, k_sorted, group)
                    kavg = float(q_pos.float().mean()) + 1.0 if active.numel() else 0.0
            ops.scatter_kv(K[layer], V[layer], active, k, v)
            if probe_layer == layer:
                probe = _attention_probs(engine, q, K[layer], pos[None, :] <= q_pos[:, None])
            a = ops.selective_attention(q, K[layer], V[layer], q_pos, pos, engine.scaling,
                                        k_sorted=k_sorted, plan=plan)
            h = engine.finish_layer(layer, h, a.transpose(0, 1).reshape(q.shape[1], -1))
            n = active.numel()
            computed += n
            flops += lin * n + attention_flops(engine.spec, n, kavg) / L
        logits = engine.logits(h[-1:])[0]
    return SelectiveOutput(KVCache(K, V, pos), logits, computed, flops, active, probe,
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
