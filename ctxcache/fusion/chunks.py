"""Turning segments into a positioned layout backed by chunk caches.

Shared by every reuse strategy: validation of the segment list, lookup (or on-the-fly build and
store) of each chunk's cache, and assembly of the prompt's K/V with cached keys re-positioned.

Everything here that decides *what* to do runs on the host (token checks, keys, slot tables),
so the device sees one upload and one assembly launch per prompt and never waits in between.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from ctxcache.engine.flops import prefill_flops
from ctxcache.engine.kvcache import KVCache
from ctxcache.engine.runner import upload
from ctxcache.errors import ChunkMismatchError, InvalidInputError, UnknownChunkError
from ctxcache.fusion.types import FusionContext, FusionStats, Segment
from ctxcache.kv.keys import chunk_key


@dataclass
class Piece:
    role: str
    token_ids: list[int]
    start: int  # first position in the prompt
    key: str | None = None  # standalone chunk key (chunks and prefixes)
    arr: np.ndarray | None = None  # the same ids as int64 (validated once, hashed, uploaded)

    def __post_init__(self) -> None:
        if self.arr is None:
            self.arr = np.asarray(self.token_ids, dtype=np.int64)

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
        arr = engine.check_ids(ids)  # host-side range check: no device round trip
        key = None
        if seg.role in ("chunk", "prefix"):
            key = chunk_key(engine.fingerprint, arr)
            if seg.key is not None and seg.key != key:
                raise ChunkMismatchError(f"chunk key {seg.key} does not match its tokens")
        pieces.append(Piece(seg.role, ids if isinstance(ids, list) else arr.tolist(), pos, key,
                            arr))
        pos += len(ids)
    if pos + 1 > engine.spec.max_positions:
        raise InvalidInputError(f"prompt of {pos} tokens exceeds the model context")
    last = pieces[-1]
    if last.role != "text":
        if len(last.token_ids) == 1:
            last.role, last.key = "text", None
        else:
            tail = last.token_ids[-1]
            last.token_ids, last.arr = last.token_ids[:-1], last.arr[:-1]
            last.key = chunk_key(engine.fingerprint, last.arr)
            pieces.append(Piece("text", [tail], last.end))
    return pieces


def all_ids(pieces: Sequence[Piece]) -> list[int]:
    return [t for p in pieces for t in p.token_ids]


def trailing_text_start(pieces: Sequence[Piece]) -> int:
    """First slot of the trailing run of text pieces (the question); the prompt's length when
    it ends in cached material."""
    start = pieces[-1].end if pieces else 0
    for p in reversed(pieces):
        if p.role != "text":
            break
        start = p.start
    return start


def ids_array(pieces: Sequence[Piece]) -> np.ndarray:
    return np.concatenate([p.arr for p in pieces])


def chunk_kv(ctx: FusionContext, ids, stats: FusionStats, *,
             prefix: KVCache | None = None, prefix_key: str | None = None,
             store_new: bool = True) -> tuple[str, KVCache]:
    """A chunk's cached K/V (encoded at positions 0.. or right after ``prefix``).

    A miss is computed now and stored (admission permitting), so the next prompt reuses it.
    """
    engine = ctx.engine
    key = chunk_key(engine.fingerprint, ids, prefix_key)
    kv = stored_kv(ctx, key, len(ids), stats)
    if kv is not None:
        return key, kv
    stats.chunk_misses += 1
    stats.hit_tokens = stats.hit_tokens or 0
    out = engine.prefill(ids, kv=prefix, logits="none")
    n_past = prefix.num_tokens if prefix is not None else 0
    out.kv.first_position = n_past
    cost = prefill_flops(engine.spec, len(ids), n_past)
    stats.extra["build_flops"] = stats.extra.get("build_flops", 0.0) + cost
    if store_new:  # write-behind: the request does not wait for the store
        ctx.store.put_later(out.kv, ids, model=engine.fingerprint, namespace=ctx.namespace,
                            prefix_key=prefix_key, recompute_cost=cost)
    return key, out.kv


def stored_kv(ctx: FusionContext, key: str, n: int, stats: FusionStats) -> KVCache | None:
    """The store's K/V of ``key`` (counted as a hit of ``n`` tokens), or None."""
    engine = ctx.engine
    # raw entries stay where their tier keeps them (assembly reads them in place); compressed
    # ones are decoded on the engine's device
    device = None if ctx.store.codec == "raw" else engine.device
    entry = ctx.store.get(key, ctx.namespace, device=device)
    if entry is None or entry.meta.model != engine.fingerprint:
        return None
    stats.chunk_hits += 1
    stats.hit_tokens = (stats.hit_tokens or 0) + n
    kv = entry.kv
    return kv if kv.k.dtype == engine.dtype else kv.to(dtype=engine.dtype)


@dataclass
class PrefixState:
    """The prompt's leading prefix (system prompt): exact K/V at positions 0..s-1 and its key."""

    ids: np.ndarray | list[int]
    kv: KVCache | None
    key: str | None

    @property
    def length(self) -> int:
        return len(self.ids)


def load_prefix(ctx: FusionContext, pieces: Sequence[Piece], stats: FusionStats) -> PrefixState:
    parts = [p.arr for p in pieces if p.role == "prefix"]
    if not parts:
        return PrefixState([], None, None)
    ids = np.concatenate(parts)
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
    ids = piece.arr
    ckey = chunk_key(engine.fingerprint, ids, prefix.key) if prefix.kv is not None \
        else piece.key
    if not ctx.store.contains(ckey, ctx.namespace):
        if prefix.kv is not None and ctx.store.contains(piece.key, ctx.namespace):
            stats.extra["unconditioned_chunks"] = stats.extra.get("unconditioned_chunks", 0) + 1
            return chunk_kv(ctx, ids, stats)[1]
        # encoded after another prefix (a document ingested under another system prompt, a
        # message another agent sent): placed and repaired like any cached chunk
        other = ctx.store.variant_of(piece.key, ctx.namespace)
        kv = stored_kv(ctx, other, len(ids), stats) if other is not None else None
        if kv is not None:
            stats.extra["other_prefix_chunks"] = stats.extra.get("other_prefix_chunks", 0) + 1
            return kv
    if prefix.kv is not None:
        return chunk_kv(ctx, ids, stats, prefix=prefix.kv, prefix_key=prefix.key)[1]
    return chunk_kv(ctx, ids, stats)[1]


Loader = Callable[[FusionContext, Piece, PrefixState, FusionStats], KVCache]


@dataclass
class Source:
    """A cached span placed in the prompt: tokens [start, end) come from ``kv`` (its tokens
    ``offset``…), keys rotated by ``delta`` positions."""

    start: int
    end: int
    kv: KVCache
    delta: int
    offset: int = 0


@dataclass
class Assembled:
    kv: KVCache  # the prompt's K/V (a view of ``storage``), positions 0..N-1 unless placed
    storage: KVCache  # the whole buffer, with room for the answer after the prompt
    cached: np.ndarray  # bool [N] (host): token came from a cache
    ready: list | None = None  # per-layer CUDA events when layers still arrive asynchronously
    sources: list | None = None  # tiers' tensors kept alive until the copies complete


def lookup(ctx: FusionContext, pieces: Sequence[Piece], stats: FusionStats,
           loader: Loader = load_chunk) -> tuple[PrefixState, list[Source]]:
    """Every cached span of the prompt (prefix, then chunks) with the shift that places it."""
    prefix = load_prefix(ctx, pieces, stats)
    sources: list[Source] = []
    if prefix.kv is not None:
        sources.append(Source(0, prefix.length, prefix.kv, 0))
    for p in pieces:
        if p.role != "chunk":
            continue
        kv = loader(ctx, p, prefix, stats)
        sources.append(Source(p.start, p.end, kv, p.start - _first_position(kv)))
    return prefix, sources


def _first_position(kv: KVCache) -> int:
    """Where a cached chunk starts (a host int: no device read when the tier keeps it)."""
    first = getattr(kv, "first_position", None)
    if first is None:
        first = int(kv.positions[0])
        kv.first_position = first
    return first


def _on_device(t: Tensor, device: torch.device) -> bool:
    return t.device == device or (t.device.type == device.type and device.type != "cuda")


def with_room(engine, k: Tensor, v: Tensor, extra: int) -> KVCache:
    """A copy of K/V rows [L, Hkv, n, D] in a new buffer with ``extra`` free slots after them
    (positions 0..n+extra-1), so decoding continues in place."""
    n = k.shape[2]
    s = engine.spec
    cap = n + max(0, int(extra))
    K = torch.empty(s.num_layers, s.num_kv_heads, cap, s.head_dim, dtype=engine.dtype,
                    device=engine.device)
    V = torch.empty_like(K)
    K[:, :, :n].copy_(k)
    V[:, :, :n].copy_(v)
    return KVCache(K, V, torch.arange(cap, device=engine.device))


def assemble(ctx: FusionContext, n: int, sources: Sequence[Source],
             positions: Tensor | None = None) -> Assembled:
    """The prompt's K/V in one buffer with ``ctx.reserve_tokens`` of room after it: cached
    spans copied into their slots with keys re-rotated, other slots left for the computation.

    With the Triton ops this is one kernel launch for all spans and layers (spans are read in
    place through per-span offsets). Spans in host memory are read layer by layer on a side
    stream with one event per layer, so the layer loop starts on layer 0 while the later
    layers are still on their way (loading overlapped with recompute).
    """
    engine = ctx.engine
    s = engine.spec
    dev = engine.device
    cap = n + max(0, int(ctx.reserve_tokens))
    K = torch.empty(s.num_layers, s.num_kv_heads, cap, s.head_dim, dtype=engine.dtype,
                    device=dev)
    V = torch.empty_like(K)
    cached = cached_mask(n, sources)
    pos = positions if positions is not None else torch.arange(n, device=dev)
    storage = KVCache(K, V, torch.arange(cap, device=dev))
    ready = None
    if engine.ops.assemble_kv is not None:
        ready = _assemble_triton(engine, K, V, n, sources)
    else:
        _assemble_torch(engine, K, V, n, sources)
    return Assembled(KVCache(K[:, :, :n], V[:, :, :n], pos), storage, cached, ready,
                     [src.kv for src in sources])


def _assemble_torch(engine, K: Tensor, V: Tensor, n: int, sources: Sequence[Source]) -> None:
    inv = engine.rope.inv_freq_on(engine.device)
    K[:, :, :n].zero_()
    V[:, :, :n].zero_()
    for src in sources:
        b = src.offset + src.end - src.start
        K[:, :, src.start:src.end].copy_(src.kv.k[:, :, src.offset:b])
        V[:, :, src.start:src.end].copy_(src.kv.v[:, :, src.offset:b])
        if src.delta:
            engine.ops.rope_shift(K[:, :, src.start:src.end],
                                  torch.full((src.end - src.start,), src.delta,
                                             device=engine.device), inv)


def cached_mask(n: int, sources: Sequence[Source]) -> np.ndarray:
    """bool [n] (host): which prompt tokens come from a cache."""
    cached = np.zeros(n, dtype=bool)
    for src in sources:
        cached[src.start:src.end] = True
    return cached


def device_resident(engine, sources: Sequence[Source]) -> bool:
    return all(_on_device(src.kv.k, engine.device) for src in sources)


def readable_in_place(engine, sources: Sequence[Source]) -> bool:
    """Every span is in the engine's memory, or in page-locked host memory that its kernels
    read directly (so one assembly launch needs no copies first)."""
    return all(_on_device(src.kv.k, engine.device) or (
        engine.device.type == "cuda" and src.kv.k.is_pinned() and src.kv.v.is_pinned()
        and zero_copy_ok(engine.device)) for src in sources)


def _assemble_triton(engine, K: Tensor, V: Tensor, n: int, sources: Sequence[Source],
                     n_slots: int | None = None, layerwise: bool = True):
    """Triton assembly of ``n`` prompt slots (plus zeroed slots up to ``n_slots``). Spans in
    host memory are read layer by layer on a side stream (``layerwise``) or in one launch."""
    from ctxcache.kernels.triton_ops import source_offsets

    dev = engine.device
    pairs, host = [], False
    for src in sources:
        k, v = src.kv.k, src.kv.v
        if not (k.is_contiguous() and v.is_contiguous()):
            k, v = k.contiguous(), v.contiguous()
        if not _on_device(k, dev):
            if dev.type == "cuda" and k.is_pinned() and v.is_pinned() and zero_copy_ok(dev):
                host = True  # read in place over the bus (same address on both sides)
            else:
                k, v = k.to(dev, non_blocking=True), v.to(dev, non_blocking=True)
        pairs.append((k, v))
    ok, ov, ln = source_offsets(K, V, pairs) if pairs else ([], [], [])
    n = n if n_slots is None else n_slots
    slot_src = np.full(n, -1, dtype=np.int64)
    slot_tok = np.zeros(n, dtype=np.int64)
    delta = np.zeros(n, dtype=np.int64)
    for i, src in enumerate(sources):
        slot_src[src.start:src.end] = i
        slot_tok[src.start:src.end] = np.arange(src.offset, src.offset + src.end - src.start)
        delta[src.start:src.end] = src.delta
    tables = upload(np.concatenate([np.asarray(ok + ov + ln, dtype=np.int64), slot_src,
                                    slot_tok, delta]), torch.int64, dev)
    inv = engine.rope.inv_freq_on(dev)
    shift = bool(delta.any())
    L = engine.spec.num_layers
    if not host or not layerwise:
        engine.ops.assemble_kv(K, V, tables, n, inv, shift)
        return None
    cur = torch.cuda.current_stream(dev)
    side = getattr(engine, "_copy_stream", None)
    if side is None:
        side = engine._copy_stream = torch.cuda.Stream(device=dev)
    side.wait_stream(cur)  # the buffers and tables were made on the compute stream
    ready = []
    with torch.cuda.stream(side):
        for layer in range(L):
            engine.ops.assemble_kv(K, V, tables, n, inv, shift, layers=(layer, 1))
            ev = torch.cuda.Event()
            ev.record(side)
            ready.append(ev)
    K.record_stream(side)
    V.record_stream(side)
    tables.record_stream(side)
    return ready


_ZERO_COPY: dict[str, bool] = {}


def zero_copy_ok(device: torch.device) -> bool:
    """Whether kernels on ``device`` read page-locked host memory at its host address (unified
    addressing); checked once per device with a tiny assembly compared against a copy."""
    key = str(device)
    if key not in _ZERO_COPY:
        try:
            from ctxcache.kernels.triton_ops import assemble_kv, source_offsets

            src_k = torch.randn(1, 1, 4, 8).to(torch.float16).pin_memory()
            src_v = torch.randn(1, 1, 4, 8).to(torch.float16).pin_memory()
            K = torch.zeros(1, 1, 4, 8, dtype=torch.float16, device=device)
            V = torch.zeros_like(K)
            ok, ov, ln = source_offsets(K, V, [(src_k, src_v)])
            tables = torch.tensor(ok + ov + ln + [0] * 4 + list(range(4)) + [0] * 4,
                                  dtype=torch.int64, device=device)
            assemble_kv(K, V, tables, 4, torch.ones(4, device=device), False)
            torch.cuda.synchronize(device)
            _ZERO_COPY[key] = bool(torch.equal(K.cpu(), src_k) and torch.equal(V.cpu(), src_v))
        except Exception:  # noqa: BLE001 - any failure means: copy first, then assemble
            _ZERO_COPY[key] = False
    return _ZERO_COPY[key]


def full_flops(ctx: FusionContext, n: int) -> float:
    return prefill_flops(ctx.engine.spec, n)
