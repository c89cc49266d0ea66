"""Turning segments into a positioned layout backed by chunk caches.

Shared by every reuse strategy: validation of the segment list, lookup (or on-the-fly build and
store) of each chunk's cache, and re-positioning of cached keys with RoPE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from ctxcache.engine.flops import prefill_flops
from ctxcache.engine.kvcache import KVCache
from ctxcache.errors import ChunkMismatchError, InvalidInputError, UnknownChunkError
from ctxcache.fusion.base import FusionContext, FusionStats, Segment
from ctxcache.kv.keys import chunk_key


@dataclass
class Piece:
    role: str
    token_ids: list[int]
    start: int  # first position in the prompt
    key: str | None = None  # standalone chunk key (chunks and prefixes)

    @property
    def end(self) -> int:
        return self.start + len(self.token_ids)


def resolve(ctx: FusionContext, segments: Sequence[Segment]) -> list[Piece]:
    """Validate segments, fill in tokens of key-only chunks, lay them out at positions 0..N-1.

    The prompt's last token is always computed: if the last segment is cached material, its
    last token is split off into a text piece.
    """
    if not segments:
        raise InvalidInputError("empty prompt: no segments")
    engine = ctx.engine
    pieces: list[Piece] = []
    pos = 0
    seen_other = False
    for i, seg in enumerate(segments):
        if not isinstance(seg, Segment):
            raise InvalidInputError(f"segment {i} is not a Segment")
        if seg.role == "prefix" and seen_other:
            raise InvalidInputError("prefix segments must come before chunks and text")
        seen_other |= seg.role != "prefix"
        ids = seg.token_ids
        if ids is None:  # a chunk named by key only
            entry = ctx.store.get(seg.key, ctx.namespace)
            if entry is None:
                raise UnknownChunkError(f"unknown chunk key {seg.key!r} for namespace "
                                        f"{ctx.namespace!r}")
            if entry.meta.model != engine.fingerprint:
                raise ChunkMismatchError(
                    f"chunk {seg.key} was computed by model {entry.meta.model!r}, not "
                    f"{engine.fingerprint!r}")
            ids = entry.token_ids.tolist()
        engine.as_ids(ids)  # range check
        key = None
        if seg.role in ("chunk", "prefix"):
            key = chunk_key(engine.fingerprint, ids)
            if seg.key is not None and seg.key != key:
                raise ChunkMismatchError(f"chunk key {seg.key} does not match its tokens")
        pieces.append(Piece(seg.role, list(ids), pos, key))
        pos += len(ids)
    if pos + 1 > engine.spec.max_positions:
        raise InvalidInputError(f"prompt of {pos} tokens exceeds the model context")
    last = pieces[-1]
    if last.role != "text":
        if len(last.token_ids) == 1:
            last.role, last.key = "text", None
        else:
            tail = last.token_ids[-1]
            last.token_ids = last.token_ids[:-1]
            last.key = chunk_key(engine.fingerprint, last.token_ids)
            pieces.append(Piece("text", [tail], last.end))
    return pieces


def all_ids(pieces: Sequence[Piece]) -> list[int]:
    return [t for p in pieces for t in p.token_ids]


def chunk_kv(ctx: FusionContext, ids: list[int], stats: FusionStats, *,
             prefix: KVCache | None = None, prefix_key: str | None = None,
             store_new: bool = True) -> tuple[str, KVCache]:
    """A chunk's cached K/V (encoded at positions 0.. or right after ``prefix``).

    A miss is computed now and stored (admission permitting), so the next prompt reuses it.
    """
    engine = ctx.engine
    key = chunk_key(engine.fingerprint, ids, prefix_key)
    # raw entries stay where their tier keeps them (assemble copies them straight into place,
    # layer by layer); compressed ones are decoded on the engine's device
    device = None if ctx.store.codec == "raw" else engine.device
    entry = ctx.store.get(key, ctx.namespace, device=device)
    if entry is not None and entry.meta.model == engine.fingerprint:
        stats.chunk_hits += 1
        kv = entry.kv
        return key, kv if kv.k.dtype == engine.dtype else kv.to(dtype=engine.dtype)
    stats.chunk_misses += 1
    out = engine.prefill(ids, kv=prefix, logits="none")
    n_past = prefix.num_tokens if prefix is not None else 0
    cost = prefill_flops(engine.spec, len(ids), n_past)
    stats.extra["build_flops"] = stats.extra.get("build_flops", 0.0) + cost
    if store_new:  # write-behind: the request does not wait for the store
        ctx.store.put_later(out.kv, ids, model=engine.fingerprint, namespace=ctx.namespace,
                            prefix_key=prefix_key, recompute_cost=cost)
    return key, out.kv


@dataclass
class PrefixState:
    """The prompt's leading prefix (system prompt): exact K/V at positions 0..s-1 and its key."""

    ids: list[int]
    kv: KVCache | None
    key: str | None

    @property
    def length(self) -> int:
        return len(self.ids)


def load_prefix(ctx: FusionContext, pieces: Sequence[Piece], stats: FusionStats) -> PrefixState:
    ids = [t for p in pieces if p.role == "prefix" for t in p.token_ids]
    if not ids:
        return PrefixState([], None, None)
    key, kv = chunk_kv(ctx, ids, stats)
    return PrefixState(ids, kv, key)


def load_chunk(ctx: FusionContext, piece: Piece, prefix: PrefixState, stats: FusionStats
               ) -> KVCache:
    """A chunk's cache, at the positions it was encoded at (not yet placed).

    Chunks are encoded *after the shared prefix* when there is one (keyed by chunk + prefix):
    the chunk then sees the same attention sink and instructions as in the real prompt, which
    removes most of its K/V deviation. If only the prefix-free cache exists (e.g. ingested
    before the system prompt was known) it is used rather than recomputed.
    """
    engine = ctx.engine
    if prefix.kv is not None:
        ckey = chunk_key(engine.fingerprint, piece.token_ids, prefix.key)
        if not ctx.store.contains(ckey, ctx.namespace) and ctx.store.contains(
                piece.key, ctx.namespace):
            stats.extra["unconditioned_chunks"] = stats.extra.get("unconditioned_chunks", 0) + 1
            return chunk_kv(ctx, piece.token_ids, stats)[1]
        return chunk_kv(ctx, piece.token_ids, stats, prefix=prefix.kv, prefix_key=prefix.key)[1]
    return chunk_kv(ctx, piece.token_ids, stats)[1]


Loader = Callable[[FusionContext, Piece, PrefixState, FusionStats], KVCache]


@dataclass
class Assembled:
    kv: KVCache  # the prompt's K/V in one fresh buffer (text slots are zeros)
    cached: Tensor  # bool [N]: token came from a cache
    ready: list | None = None  # per-layer CUDA events when layers still arrive asynchronously
    sources: list | None = None  # tiers' tensors kept alive until the copies complete


def assemble(ctx: FusionContext, pieces: Sequence[Piece], stats: FusionStats,
             loader: Loader = load_chunk) -> Assembled:
    """The prompt's K/V in one fresh buffer: the prefix, cached chunks moved to their place,
    zeros for text.

    Each chunk is copied straight from its tier into its slot, then RoPE-shifted in place. When
    chunks live in host memory and the engine is on CUDA, the copies run layer by layer on a
    side stream with one event per layer, so the layer loop starts computing layer 0 while the
    later layers are still on their way (loading overlapped with recompute).
    """
    engine = ctx.engine
    s = engine.spec
    n = pieces[-1].end
    K = torch.zeros(s.num_layers, s.num_kv_heads, n, s.head_dim, dtype=engine.dtype,
                    device=engine.device)
    V = torch.zeros_like(K)
    delta = torch.zeros(n, dtype=torch.int32)
    cached = torch.zeros(n, dtype=torch.bool)
    prefix = load_prefix(ctx, pieces, stats)
    sources: list[tuple[int, int, KVCache]] = []
    if prefix.kv is not None:
        sources.append((0, prefix.length, prefix.kv))
        cached[: prefix.length] = True
    for p in pieces:
        if p.role != "chunk":
            continue
        kv = loader(ctx, p, prefix, stats)
        sources.append((p.start, p.end, kv))
        delta[p.start:p.end] = p.start - int(kv.positions[0])
        cached[p.start:p.end] = True
    shifted = bool(delta.any())
    inv = engine.rope.inv_freq_on(engine.device)
    delta_dev = delta.to(engine.device)
    pos = torch.arange(n, device=engine.device)
    remote = [src for src in sources if src[2].k.device != K.device]
    if K.device.type == "cuda" and remote:
        cur = torch.cuda.current_stream()
        side = getattr(engine, "_copy_stream", None)
        if side is None:
            side = engine._copy_stream = torch.cuda.Stream(device=K.device)
        side.wait_stream(cur)  # buffers and deltas were made on the compute stream
        ready = []
        with torch.cuda.stream(side):
            for layer in range(s.num_layers):
                for a, b, kv in sources:
                    K[layer, :, a:b].copy_(kv.k[layer], non_blocking=True)
                    V[layer, :, a:b].copy_(kv.v[layer], non_blocking=True)
                if shifted:
                    engine.ops.rope_shift(K[layer], delta_dev, inv)
                ev = torch.cuda.Event()
                ev.record(side)
                ready.append(ev)
        K.record_stream(side)
        V.record_stream(side)
        return Assembled(KVCache(K, V, pos), cached.to(engine.device), ready, sources)
    for a, b, kv in sources:
        K[:, :, a:b].copy_(kv.k, non_blocking=True)
        V[:, :, a:b].copy_(kv.v, non_blocking=True)
    if shifted:
        engine.ops.rope_shift(K, delta_dev, inv)
    return Assembled(KVCache(K, V, pos), cached.to(engine.device))


def full_flops(ctx: FusionContext, n: int) -> float:
    return prefill_flops(ctx.engine.spec, n)
