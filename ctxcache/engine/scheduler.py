"""The serving engine: iteration-level continuous batching with reuse strategies as prefill.

Requests join and leave the running batch between steps (Orca / vLLM / SGLang style). One step:

1. drop cancelled requests (client gone), waiting or running, and free their pages;
2. make room for every running sequence's next token — a new page when its last one is full;
   when the pool has too few, the most recently admitted sequences are *swapped* to host
   memory (exact: their pages are copied out and back) instead of failing;
3. bring swapped sequences back, then admit waiting requests while the step's prefill-token
   budget, the running-sequence limit and the free pages allow. A request's prefill is its
   reuse strategy's ``build`` (full / prefix / CacheBlend / Cache-Craft / APE / KVCOMM / auto,
   run by the caller-supplied closure); its K/V is written into pages (leading blocks of an
   exact causal prefix are mapped from the shared set instead), and its first token is
   sampled and streamed at once. A request that names its prompt's tokens up front gets the
   pool's resident prefix of them (pages a finished or running request of the same namespace
   left): exact prefix reuse then reads those rows in device memory, not the chunk store;
4. one batched decode forward for every running sequence (``ModelRunner``), then per-request
   sampling (each request's own temperature / top-p / top-k / seed), stop strings, EOS and
   max_tokens.

Prefill and decode alternate: at most ``max_prefill_tokens`` of new prompts enter per step
(at least one prompt, however long), so running decodes are never stalled by more than one
step's prefills. A prompt is not split across steps (chunked prefill is not implemented for
the reuse strategies, whose plans cover the whole prompt).

Threads: one engine thread runs the loop; ``submit`` is thread-safe and returns a handle whose
iterator blocks on that request's own queue. The loop holds ``engine.lock`` for each forward,
so other users of the engine (document ingestion) interleave between steps.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from ctxcache.engine.generate import GenerationChunk
from ctxcache.engine.kv_pool import OutOfBlocks, PagedKVPool, block_hashes
from ctxcache.engine.model_runner import DecodeRow, ModelRunner
from ctxcache.engine.sampling import Sampler, SamplingParams
from ctxcache.engine.textstream import TextStream
from ctxcache.errors import CtxCacheError, InvalidInputError

log = logging.getLogger("ctxcache.scheduler")

EXACT_STRATEGIES = ("full", "prefix")  # every prompt row is the exact causal K/V


class EngineStopped(CtxCacheError):
    """The serving engine was shut down before this request finished."""


@dataclass
class EngineRequest:
    """What a caller submits. ``build`` runs on the engine thread at admission and returns a
    ``FusionResult`` (the prompt's K/V, last-token logits, statistics)."""

    build: Callable[..., object]
    params: SamplingParams
    prompt_tokens: int  # known before the build: used for the page budget
    exact_prefix_tokens: int = 0  # leading tokens whose K/V any strategy computes exactly
    should_stop: Callable[[], bool] | None = None
    constraint: object = None  # structured.Constraint: a grammar the answer must follow
    # the prompt's tokens, when known before the build: ``build`` is then called with the
    # pool's ``ResidentPrefix`` of them (or None) — exact prefix reuse from device pages
    prompt_ids: list[int] | None = None
    namespace: str = ""  # the owner: pages are mapped and reused only within one namespace


class RequestHandle:
    """The caller's side of one request: iterate it for ``GenerationChunk``s; ``info`` is
    filled at prefill (prompt tokens, cached tokens, strategy, statistics, timings)."""

    def __init__(self, rid: int):
        self.rid = rid
        self.info: dict = {}
        self._q: "queue.SimpleQueue" = queue.SimpleQueue()
        self._cancel = threading.Event()
        self.t_submit = time.perf_counter()
        self.t_first: float | None = None
        self.t_done: float | None = None
        self.token_times: list[float] = []

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def _put(self, item) -> None:
        self._q.put(item)

    def __iter__(self) -> Iterator[GenerationChunk]:
        while True:
            item = self._q.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason:
                return


@dataclass
class Sequence:
    req: EngineRequest
    handle: RequestHandle
    order: int
    blocks: list[int] = field(default_factory=list)
    n_kv: int = 0  # K/V rows in the pool
    next_pos: int = 0
    pending: int | None = None  # sampled token whose K/V is not written yet
    step: int = 0  # tokens sampled so far
    sampler: Sampler | None = None
    text: TextStream | None = None
    group: object = None  # APE's ContextGroup
    key_pos: list[int] | None = None  # key positions (APE only)
    swapped: tuple | None = None  # (k, v) on the host while preempted


class ServingEngine:
    def __init__(self, engine, *, max_running: int = 32, max_prefill_tokens: int = 8192,
                 kv_bytes: int | None = None, kv_fraction: float = 0.4, block_size: int = 16,
                 max_model_len: int | None = None, cuda_graphs: bool = True,
                 pool: PagedKVPool | None = None, pool_prefix: bool = True):
        if max_running < 1:
            raise InvalidInputError("max_running must be at least 1")
        self.engine = engine
        self.max_running = max_running
        # exact prefix reuse reads the prompt's resident pages (requests with prompt_ids)
        self.pool_prefix = pool_prefix
        self.max_prefill_tokens = max(1, max_prefill_tokens)
        self.max_model_len = min(max_model_len or engine.spec.max_positions,
                                 engine.spec.max_positions)
        self.pool = pool or PagedKVPool.for_engine(engine, bytes_=kv_bytes, fraction=kv_fraction,
                                                   block_size=block_size)
        self.capacity_tokens = (self.pool.num_blocks - 1) * self.pool.block_size
        self.runner = ModelRunner(engine, self.pool, max_running,
                                  min(self.max_model_len, self.capacity_tokens), cuda_graphs)
        self._inbox: deque = deque()
        self.waiting: deque[Sequence] = deque()
        self.swapped: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._cv = threading.Condition()
        self._ids = itertools.count()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.stats = {"steps": 0, "decode_tokens": 0, "prefills": 0, "preemptions": 0,
                      "cancelled": 0, "batch_size_sum": 0,
                      # pages in use vs pages the running sequences map (their difference is
                      # what sharing saves), at the step where each peaked
                      "peak_blocks_used": 0, "peak_blocks_mapped": 0}
        self._t_tokens: deque = deque(maxlen=4096)  # (time, n) for tokens/s
        # background work run only while nothing is waiting or running (the planner's
        # deferred answer checks); returns True when it did something
        self.idle_work: Callable[[], bool] | None = None
        # reuse-loop CUDA graphs are captured in idle time too, never on a request's path
        self._graphs = None
        if cuda_graphs and engine.device.type == "cuda":
            from ctxcache.fusion.graphs import loop_graphs

            self._graphs = loop_graphs(engine)
            if self._graphs is not None:
                self._graphs.deferrers += 1
        self._settled = threading.Event()  # idle with no background work left

    # ------------------------------------------------------------------ public API
    def start(self) -> "ServingEngine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="ctxcache-engine",
                                            daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        with self._cv:
            if self._graphs is not None and not self._stop:
                self._graphs.deferrers -= 1  # direct users of the engine capture inline again
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def settle(self, timeout: float = 30.0) -> bool:
        """Wait until nothing is running or waiting and the idle-time work (graph captures,
        deferred checks) is done; False on timeout. Benchmarks call it between steps where a
        real client would spend time elsewhere (an agent running its tool)."""
        if self._thread is None:
            return True
        return self._settled.wait(timeout)

    def _idle_tasks(self) -> bool:
        for task in (self.idle_work,
                     self._graphs.capture_pending if self._graphs is not None else None):
            if task is None:
                continue
            try:
                if task():
                    return True
            except Exception:  # noqa: BLE001 - background work must not stop serving
                log.exception("idle work failed")
        return False

    def submit(self, req: EngineRequest) -> RequestHandle:
        need = req.prompt_tokens + req.params.max_tokens
        if need > self.max_model_len:
            raise InvalidInputError(
                f"prompt of {req.prompt_tokens} tokens + max_tokens {req.params.max_tokens} "
                f"exceeds the model's context of {self.max_model_len} tokens")
        if need > self.capacity_tokens:
            raise InvalidInputError(
                f"prompt of {req.prompt_tokens} tokens + max_tokens {req.params.max_tokens} "
                f"needs more K/V than this server's pool holds ({self.capacity_tokens} tokens)")
        if self._stop:
            raise EngineStopped("the serving engine is shut down")
        h = RequestHandle(next(self._ids))
        with self._cv:
            self._settled.clear()
            self._inbox.append(Sequence(req, h, h.rid))
            self._cv.notify()
        if self._thread is None:
            self.start()
        return h

    def snapshot(self) -> dict:
        """Scheduler state for metrics and /v1/cache/stats."""
        now = time.perf_counter()
        recent = [n for t, n in list(self._t_tokens) if now - t <= 10.0]
        st = self.stats
        return {"running": len(self.running), "waiting": len(self.waiting) + len(self._inbox),
                "swapped": len(self.swapped), "pool": self.pool.stats().as_dict(),
                "tokens_per_s_10s": sum(recent) / 10.0,
                "mean_batch": st["batch_size_sum"] / st["steps"] if st["steps"] else 0.0,
                **st, "runner": self.runner.describe()}

    # ------------------------------------------------------------------ loop
    def _idle(self) -> bool:
        return not self._inbox and not self.waiting and not self.running and not self.swapped

    def _loop(self) -> None:
        while True:
            if not self._stop and self._idle() and self._idle_tasks():
                continue
            with self._cv:
                while not self._stop and self._idle():
                    self._settled.set()
                    self._cv.wait()
                if self._stop:
                    break
                while self._inbox:
                    self.waiting.append(self._inbox.popleft())
            try:
                self.step()
            except Exception as e:  # noqa: BLE001 - fail the batch, keep serving
                log.exception("engine step failed")
                for s in self.running + list(self.swapped):
                    self._fail(s, e)
                self.running, self.swapped = [], deque()
        self._settled.set()
        err = EngineStopped("the serving engine is shut down")
        for s in self.running + list(self.waiting) + list(self.swapped) + list(self._inbox):
            self._fail(s, err)

    def step(self) -> None:
        self._drop_cancelled()
        self._reserve_decode_room()
        self._resume_swapped()
        self._admit()
        if self.running:
            self._decode()
        st = self.stats
        st["steps"] += 1
        st["batch_size_sum"] += len(self.running)
        st["peak_blocks_used"] = max(st["peak_blocks_used"], self.pool.stats().used)
        st["peak_blocks_mapped"] = max(st["peak_blocks_mapped"],
                                       sum(len(s.blocks) for s in self.running))

    # ------------------------------------------------------------------ steps
    @staticmethod
    def _is_cancelled(s: Sequence) -> bool:
        return s.handle.cancelled or (s.req.should_stop is not None and s.req.should_stop())

    def _drop_cancelled(self) -> None:
        for group in (self.running, self.waiting, self.swapped):
            keep = [s for s in group if not self._is_cancelled(s)]
            for s in group:
                if self._is_cancelled(s):
                    self.stats["cancelled"] += 1
                    self._finish(s, GenerationChunk(s.text.flush() if s.text else "", None,
                                                    "cancelled"))
            group.clear()
            group.extend(keep)

    def _free(self, s: Sequence) -> None:
        self.pool.free(s.blocks)
        s.blocks = []

    def _finish(self, s: Sequence, chunk: GenerationChunk) -> None:
        self._free(s)
        s.swapped = None
        s.handle.t_done = time.perf_counter()
        s.handle._put(chunk)

    def _fail(self, s: Sequence, e: BaseException) -> None:
        self._free(s)
        s.handle._put(e)

    def _swap_out(self, s: Sequence) -> None:
        k, v = self.pool.gather(s.blocks, s.n_kv)
        s.swapped = (k.to("cpu"), v.to("cpu"))
        self._free(s)
        self.stats["preemptions"] += 1

    def _reserve_decode_room(self) -> None:
        """Every running sequence gets the page its next row goes to, preempting the newest
        sequences (swap to host) while the pool is short."""
        self.running.sort(key=lambda s: s.order)
        i = 0
        while i < len(self.running):
            s = self.running[i]
            if self.pool.blocks_for(s.n_kv + 1) > len(s.blocks):
                while self.pool.num_free < 1 and len(self.running) > i + 1:
                    victim = self.running.pop()
                    self._swap_out(victim)
                    self.swapped.appendleft(victim)
                if self.pool.num_free < 1:  # cannot happen: submit() bounds a lone sequence
                    self._finish(s, GenerationChunk(s.text.flush(), None, "length"))
                    self.running.pop(i)
                    continue
                s.blocks += self.pool.allocate(1)
            i += 1

    def _resume_swapped(self) -> None:
        while self.swapped and len(self.running) < self.max_running:
            s = self.swapped[0]
            need = self.pool.blocks_for(s.n_kv + 1)
            if need + len(self.running) > self.pool.num_free:
                return
            self.swapped.popleft()
            s.blocks = self.pool.allocate(need)
            k, v = s.swapped
            self.pool.write(s.blocks, 0, k.to(self.pool.k.device), v.to(self.pool.k.device))
            s.swapped = None
            self.running.append(s)

    def _admit(self) -> None:
        budget = self.max_prefill_tokens
        first = True
        while self.waiting and len(self.running) < self.max_running and not self.swapped:
            s = self.waiting[0]
            n = s.req.prompt_tokens
            if not first and n > budget:
                return
            if self.pool.blocks_for(n + 1) + len(self.running) > self.pool.num_free:
                return
            self.waiting.popleft()
            first = False
            budget -= n
            try:
                self._prefill(s)
            except OutOfBlocks:  # its prompt came out longer than announced: wait for room
                self.waiting.appendleft(s)
                return
            except Exception as e:  # noqa: BLE001 - this request fails, the batch goes on
                self._fail(s, e)

    def _prefill(self, s: Sequence) -> None:
        e = self.engine
        p = s.req.params
        bs = self.pool.block_size
        known = s.req.prompt_ids
        # the prompt's block hashes, once: for the resident lookup and the page mapping below
        known_hashes = block_hashes(known, bs, len(known) // bs, s.req.namespace) \
            if known is not None else []
        with e.lock:
            if known is not None:
                res = s.req.build(self.pool.resident(known, known_hashes)
                                  if self.pool_prefix else None)
            else:
                res = s.req.build()
        kv = res.kv
        n = kv.num_tokens
        ids = list(res.token_ids or [])
        st = res.stats
        s.handle.info.update({"prompt_tokens": st.prompt_tokens or n,
                              "cached_tokens": st.cached_tokens, "strategy": st.strategy,
                              "stats": st.as_dict()})
        if n + p.max_tokens > self.capacity_tokens:
            raise InvalidInputError(f"prompt of {n} tokens + max_tokens {p.max_tokens} needs "
                                    f"more K/V than the pool holds ({self.capacity_tokens})")
        exact = n if st.strategy in EXACT_STRATEGIES else min(s.req.exact_prefix_tokens, n)
        n_share = exact // bs if len(ids) >= exact else 0
        if n_share and ids == known:
            hashes = known_hashes[:n_share]
        else:
            hashes = block_hashes(ids, bs, n_share, s.req.namespace) if n_share else []
        shared = self.pool.lookup_shared(hashes) if hashes else []
        try:
            s.blocks = shared + self.pool.allocate(self.pool.blocks_for(n + 1) - len(shared))
        except OutOfBlocks:
            self.pool.free(shared)
            raise
        start = len(shared) * bs
        self.pool.write(s.blocks, start, kv.k[:, :, start:], kv.v[:, :, start:])
        for j in range(len(shared), n_share):
            self.pool.publish(s.blocks[j], hashes[j])
        s.n_kv = n
        pos = kv.positions
        s.next_pos = int(pos.max()) + 1 if n else 0
        if res.context_group is not None:
            s.group = res.context_group
            s.key_pos = pos.tolist()
        s.sampler = Sampler(p, e.device)
        s.text = TextStream(e.decode_ids if e.tokenizer is not None else (lambda _ids: ""),
                            p.stop)
        self.stats["prefills"] += 1
        self.running.append(s)
        logits = res.logits.reshape(1, -1)
        c = s.req.constraint
        if c is not None and c.matcher is not None:
            logits = self._mask([c], logits)
        tok = s.sampler(logits[0])
        if c is not None:
            c.accept(tok)
        self._advance(s, tok)

    def _mask(self, constraints: list, logits: torch.Tensor) -> torch.Tensor:
        """Forbid, row by row, the tokens each constraint's grammar does not allow next."""
        from ctxcache.structured import apply_mask

        return apply_mask(logits, self.engine.grammar.fill([c.matcher for c in constraints]))

    def _advance(self, s: Sequence, tok: int) -> None:
        """Feed one sampled token to a sequence: stream it, or finish it (EOS, stop string,
        max_tokens) — the same decisions as ``generate.stream_from_kv``."""
        e, p = self.engine, s.req.params
        now = time.perf_counter()
        h = s.handle
        if h.t_first is None:
            h.t_first = now
        h.token_times.append(now)
        self._t_tokens.append((now, 1))
        step = s.step
        s.step += 1
        if tok in e.eos_token_ids and not p.ignore_eos:
            self._retire(s, GenerationChunk(s.text.flush(), None, "stop"))
            return
        delta = s.text.push(tok)
        if s.text.stopped:
            self._retire(s, GenerationChunk(delta, tok, "stop"))
            return
        c = s.req.constraint
        if c is not None and c.finished:  # the grammar is complete: nothing may follow
            self._retire(s, GenerationChunk(delta + s.text.flush(), tok, "stop"))
            return
        if step == p.max_tokens - 1:
            self._retire(s, GenerationChunk(delta + s.text.flush(), tok, "length"))
            return
        h._put(GenerationChunk(delta, tok))
        s.pending = tok

    def _retire(self, s: Sequence, chunk: GenerationChunk) -> None:
        if s in self.running:
            self.running.remove(s)
        self._finish(s, chunk)

    def _decode(self) -> None:
        batch = [s for s in self.running if s.pending is not None]
        if not batch:
            return
        rows = []
        for s in batch:
            slot = s.blocks[s.n_kv // self.pool.block_size] * self.pool.block_size + \
                s.n_kv % self.pool.block_size
            kp = None
            if s.group is not None:
                s.key_pos.append(s.next_pos)
                kp = s.key_pos
            rows.append(DecodeRow(s.pending, s.next_pos, slot, s.blocks, s.n_kv + 1, s.group,
                                  kp))
        logits = self.runner.decode(rows)
        masked = [i for i, s in enumerate(batch)
                  if s.req.constraint is not None and s.req.constraint.matcher is not None]
        if masked:
            if len(masked) == len(batch):
                logits = self._mask([s.req.constraint for s in batch], logits)
            else:
                logits = logits.clone()
                logits[masked] = self._mask([batch[i].req.constraint for i in masked],
                                            logits[masked])
        greedy = [i for i, s in enumerate(batch) if s.req.params.greedy]
        toks: dict[int, int] = {}
        if greedy:
            sel = logits if len(greedy) == len(batch) else logits[greedy]
            for i, t in zip(greedy, torch.argmax(sel, dim=-1).tolist()):
                toks[i] = t
        for i, s in enumerate(batch):
            if i not in toks:
                toks[i] = s.sampler(logits[i])
        self.stats["decode_tokens"] += len(batch)
        for i, s in enumerate(batch):
            if s.req.constraint is not None:
                s.req.constraint.accept(toks[i])
            s.n_kv += 1
            s.next_pos += 1
            s.pending = None
            self._advance(s, toks[i])
