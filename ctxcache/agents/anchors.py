"""KVCOMM's anchor pool: how a shared segment's K/V deviates under the contexts seen so far.

The same text — another agent's message, a tool result, a shared document — is encoded once
without any prefix (its *base* K/V). In an agent's prompt it follows that agent's own prefix and
history, so its real K/V differs from the base. An *anchor* records one observed difference:
the segment's exact K/V under some context minus its base K/V (keys taken back to the base
positions first, so the offset does not depend on where the segment sat), together with a
*signature* of that context. For a new context, the offsets of the anchors whose signatures are
closest are blended (softmax over cosine similarity) into an estimate; below
``min_similarity`` there is no estimate and the caller computes the segment exactly, which
yields a new anchor (online update).

Anchors are entries of the KV store (same tiers, same tenancy, same eviction), under
deterministic slot keys per segment — so a restarted gateway or another replica sharing the
Redis tier finds them by probing the slots; the signature travels in the entry. At most
``max_anchors`` per segment: a new one replaces the least recently used.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ctxcache.engine.kvcache import KVCache
from ctxcache.engine.runner import Engine, upload
from ctxcache.fusion.types import FusionContext
from ctxcache.kv.keys import chunk_key


@dataclass
class Anchor:
    slot: int
    signature: np.ndarray  # [hidden] float32, unit norm
    used_at: float


@torch.inference_mode()
def signatures(engine: Engine, ids: np.ndarray, starts: list[int]) -> np.ndarray:
    """Context signature of each position in ``starts``: the normalised mean token embedding of
    everything before it (one embedding lookup and a cumulative sum for all of them)."""
    if not starts:
        return np.zeros((0, engine.spec.hidden_size), dtype=np.float32)
    top = max(starts)
    emb = engine.embed(upload(ids[:top], torch.long, engine.device)).float()
    csum = torch.cumsum(emb, 0)
    idx = torch.tensor([max(s - 1, 0) for s in starts], device=emb.device)
    mean = csum[idx] / torch.tensor([max(s, 1) for s in starts], device=emb.device)[:, None]
    return torch.nn.functional.normalize(mean, dim=-1).cpu().numpy()


class AnchorPool:
    def __init__(self, max_anchors: int = 4, min_similarity: float = 0.95, top_k: int = 2,
                 temperature: float = 0.01):
        self.max_anchors = max_anchors
        self.min_similarity = min_similarity
        self.top_k = top_k
        self.temperature = temperature
        self._known: dict[tuple[str, str], list[Anchor]] = {}
        self._lock = threading.Lock()
        self.counters = {"estimates": 0, "no_anchor": 0, "added": 0, "replaced": 0}

    @staticmethod
    def slot_key(fingerprint: str, ids, slot: int) -> str:
        return chunk_key(fingerprint, ids, f"kvcomm-anchor/{slot}")

    def anchors(self, ctx: FusionContext, ids) -> list[Anchor]:
        """The segment's anchors (signatures only), loaded from the store on first sight."""
        fp = ctx.engine.fingerprint
        seg = (ctx.namespace, chunk_key(fp, ids))
        with self._lock:
            known = self._known.get(seg)
        if known is not None:
            return known
        found = []
        for slot in range(self.max_anchors):
            e = ctx.store.get(self.slot_key(fp, ids, slot), ctx.namespace)
            if e is not None and "signature" in e.stats:
                found.append(Anchor(slot, e.stats["signature"].float().numpy(), time.time()))
        with self._lock:
            self._known[seg] = found
        return found

    def estimate(self, ctx: FusionContext, ids, signature: np.ndarray
                 ) -> tuple[list[tuple[KVCache, float]], float]:
        """([(anchor offset on the engine's device, blend weight)], best similarity) — the list
        is empty when no anchor is similar enough. The caller adds them to the base K/V
        (``apply_offsets``): blending there saves a pass over the segment's K/V."""
        anchors = self.anchors(ctx, ids)
        if not anchors:
            self.counters["no_anchor"] += 1
            return [], 0.0
        sims = np.array([float(a.signature @ signature) for a in anchors])
        order = np.argsort(-sims)[: self.top_k]
        order = [i for i in order if sims[i] >= self.min_similarity]
        best = float(sims.max())
        if not order:
            self.counters["no_anchor"] += 1
            return [], best
        w = np.exp((sims[order] - sims[order].max()) / self.temperature)
        w = w / w.sum()
        fp, dev = ctx.engine.fingerprint, ctx.engine.device
        parts = []
        for i, wi in zip(order, w):
            a = anchors[i]
            e = ctx.store.get(self.slot_key(fp, ids, a.slot), ctx.namespace, device=dev)
            if e is None:  # evicted underneath us: forget it
                with self._lock:
                    self._known.pop((ctx.namespace, chunk_key(fp, ids)), None)
                continue
            a.used_at = time.time()
            parts.append((e.kv, float(wi)))
        if not parts:
            self.counters["no_anchor"] += 1
            return [], best
        total = sum(wi for _, wi in parts)  # renormalise when an anchor went missing
        self.counters["estimates"] += 1
        return [(kv, wi / total) for kv, wi in parts], best

    def add(self, ctx: FusionContext, ids, signature: np.ndarray, offset: KVCache) -> int:
        """Record an observed offset (write-behind); returns the slot it takes."""
        fp = ctx.engine.fingerprint
        anchors = list(self.anchors(ctx, ids))
        used = {a.slot for a in anchors}
        free = [s for s in range(self.max_anchors) if s not in used]
        if free:
            slot = free[0]
            self.counters["added"] += 1
        else:
            victim = min(anchors, key=lambda a: a.used_at)
            slot = victim.slot
            anchors.remove(victim)
            ctx.store.delete(self.slot_key(fp, ids, slot), ctx.namespace)
            self.counters["replaced"] += 1
        ctx.store.put_later(offset, list(ids), model=fp, namespace=ctx.namespace,
                            prefix_key=f"kvcomm-anchor/{slot}", force=True,
                            stats={"signature": torch.from_numpy(signature.astype(np.float32))})
        anchors.append(Anchor(slot, signature.astype(np.float32), time.time()))
        with self._lock:
            self._known[(ctx.namespace, chunk_key(fp, ids))] = anchors
        return slot

    def forget(self) -> None:
        """Drop the in-memory signatures (the store keeps the anchors)."""
        with self._lock:
            self._known.clear()


@torch.inference_mode()
def apply_offsets(base: KVCache, parts: list[tuple[KVCache, float]]) -> KVCache:
    """base + Σ wᵢ·offsetᵢ in the cache dtype: one fused multiply-add per anchor and tensor (the
    offsets are stored in the cache dtype, so no float32 round trip on the hot path)."""
    dev = parts[0][0].k.device  # the engine's (the base may sit in pinned host memory)
    k, v = base.k, base.v
    for i, (off, w) in enumerate(parts):
        ok, ov = off.k.to(dev, k.dtype), off.v.to(dev, v.dtype)
        if i == 0:
            k = torch.add(k.to(dev, non_blocking=True), ok, alpha=w)
            v = torch.add(v.to(dev, non_blocking=True), ov, alpha=w)
        else:
            k.add_(ok, alpha=w)
            v.add_(ov, alpha=w)
    return KVCache(k, v, base.positions)


@torch.inference_mode()
def offset_of(engine: Engine, true_k: Tensor, true_v: Tensor, shift: int, base: KVCache
              ) -> KVCache:
    """The exact K/V of a segment placed ``shift`` positions after its base encoding, minus the
    base: keys rotated back first, so the offset is independent of where the segment sat."""
    k = true_k.clone()
    if shift:
        inv = engine.rope.inv_freq_on(k.device)
        engine.ops.rope_shift(k, torch.full((k.shape[2],), -shift, device=k.device), inv)
    dtype = true_k.dtype  # kept in the cache dtype: as precise as the K/V it corrects
    return KVCache((k.float() - base.k.to(k.device).float()).to(dtype),
                   (true_v.float() - base.v.to(k.device).float()).to(dtype),
                   torch.arange(k.shape[2], device=k.device))
