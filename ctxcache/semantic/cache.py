"""The category-aware semantic cache.

lookup: embed → category (explicit > route > classifier) → policy (threshold, TTL, cacheable)
→ HNSW search in the tenant's index → the nearest entries that share the request's context
fingerprint and are still fresh → best similarity ≥ threshold → payload by primary key.

Why one index per tenant and not per (tenant, category): a paraphrase is often classified into
another category than the question it paraphrases (a casual "hey so who wrote hamlet lol" is
"conversation", its stored original "factual"). Partitioning the search by category made those
entries unreachable. Categories now decide *policy*, not *where to look*: every entry keeps its
category, and a candidate must pass the stricter of the two thresholds (the query's and the
entry's) and the entry's own TTL; quotas stay per (tenant, category).

Vectors and the little metadata needed to filter candidates (context fingerprint, creation
time) live in memory; payloads live in SQL. That hybrid layout keeps a miss at index cost only.
On start the indexes are loaded from disk when their manifest matches the database, else rebuilt
from the stored embeddings, so SQL is the single source of truth.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import threading
import time
from collections import OrderedDict, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from sqlalchemy import bindparam, func, select, update
from sqlalchemy.orm import Session

from ctxcache.db import make_engine, migrate
from ctxcache.errors import InvalidInputError
from ctxcache.kv.keys import check_namespace
from ctxcache.paths import contained_path
from ctxcache.semantic.classifier import (
    DEFAULT_CATEGORIES, CategoryRouter, CentroidClassifier, load_examples, load_trained,
)
from ctxcache.semantic.embedder import Embedder
from ctxcache.semantic.focus import focus, same_rest
from ctxcache.semantic.guard import keys_agree
from ctxcache.semantic.language import LanguageGate, gate_for
from ctxcache.semantic.feedback import Feedback
from ctxcache.semantic.maintenance import SYNC_LAG_IDS, Maintenance
from ctxcache.semantic.types import (  # noqa: F401 - re-exported
    MAX_TEXT_CHARS, CacheHit, CacheRequest, CategoryStats, LookupResult, _Meta,
    context_fingerprint,
)
from ctxcache.semantic.index import HnswParams, VectorIndex
from ctxcache.semantic.models import EntryDocument, SemanticEntry
from ctxcache.semantic.policy import CategoryPolicy, LoadAdapter, default_policies, make_policy
from ctxcache.semantic.verified import AnswerJudge, EmbeddingJudge, VerifiedThresholds

log = logging.getLogger(__name__)

CANDIDATES = 8
# where the graph search may have missed the asked context's entries, a context with at most
# this many entries is scored exactly (its vectors read back from the graph, ~30 µs each): a
# question stored under many documents gives many identical vectors, which HNSW's neighbour
# heuristic links poorly, so the graph could not reach the one entry of the asked context
# (and hnswlib raised when it found fewer than k live entries)
EXACT_SCAN_MAX = 256
HIT_WRITE_DELAY_S = 0.5  # hit counters reach SQL within this
# built once: constructing the statement per lookup cost as much as running it
_PAYLOAD = select(SemanticEntry.response, SemanticEntry.created_at, SemanticEntry.prompt,
                  SemanticEntry.tenant, SemanticEntry.context_fp).where(
    SemanticEntry.id == bindparam("entry_id"))
_HITS = update(SemanticEntry).where(SemanticEntry.id == bindparam("entry_id")).values(
    hits=SemanticEntry.hits + bindparam("n"), last_hit_at=bindparam("last"))


class SemanticCache(Maintenance, Feedback):
    def __init__(
        self,
        embedder: Embedder,
        *,
        db_url: str | None = None,
        categories: Sequence[str] = DEFAULT_CATEGORIES,
        policies: dict[str, CategoryPolicy] | None = None,
        classifier: CentroidClassifier | None = None,
        index_dir: str | Path | None = None,
        clock: Callable[[], float] = time.time,
        load_adapter: LoadAdapter | None = None,
        verify_rate: float = 0.0,
        max_text_chars: int = MAX_TEXT_CHARS,
        seed: int | None = None,
        embedding_cache_size: int = 10_000,
        language_gate: LanguageGate | None | str = "auto",
        verifier: VerifiedThresholds | None = None,
        judge: AnswerJudge | None = None,
        hnsw: HnswParams = HnswParams(),
        key_guard: bool = True,
    ):
        self.embedder = embedder
        # texts in languages the embedder does not cover are served uncached ("auto": from the
        # embedder's declared languages; None: no gate)
        self.language_gate = gate_for(embedder) if language_gate == "auto" else language_gate
        self.categories = list(categories)
        self.policies = policies or default_policies()
        for c in self.categories:
            self.policies.setdefault(c, make_policy({}))
        self.clock = clock
        self.load = load_adapter or LoadAdapter(enabled=False)
        if not 0.0 <= verify_rate <= 1.0:
            raise InvalidInputError("verify_rate must be in [0, 1]")
        self.verify_rate = verify_rate
        self.hnsw = hnsw
        # never serve across differing numbers, ids, names, dates (``guard.py``)
        self.key_guard = key_guard
        self.verifier = verifier or VerifiedThresholds()
        self.judge = judge or EmbeddingJudge(embedder.embed)
        self.max_text_chars = max_text_chars
        self.index_dir = Path(index_dir) if index_dir else None
        self.engine = make_engine(db_url)
        migrate(self.engine)
        if classifier is None:
            classifier = load_trained(getattr(embedder, "name", ""), embedder.dim,
                                      self.categories)
        if classifier is None:
            texts, labels = zip(*[(t, c) for t, c in load_examples() if c in self.categories])
            classifier = CentroidClassifier.train(embedder.embed(list(texts)), labels,
                                                  [c for c in self.categories if c in labels])
        self.router = CategoryRouter(classifier, self.categories)
        self.stats: dict[str, CategoryStats] = defaultdict(CategoryStats)
        self.indexes: dict[str, VectorIndex] = {}  # one per tenant
        self.meta: dict[int, _Meta] = {}
        self.used_bytes: dict[tuple[str, str], int] = defaultdict(int)
        self.counts: dict[tuple[str, str], int] = defaultdict(int)
        self._owner: dict[int, tuple[str, str]] = {}
        self._by_context: dict[tuple[str, str], set[int]] = defaultdict(set)  # (tenant, fp)
        self._lock = threading.RLock()
        self._rng = random.Random(seed)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="semantic-hits")
        self._pending_hits: dict[int, tuple[int, float]] = {}  # id -> (hits, last hit time)
        self._closing = threading.Event()
        self._emb_cache: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self.embedding_cache_size = embedding_cache_size
        self._load_all()
        self._sync_floor = max(0, max(self.meta, default=0) - SYNC_LAG_IDS)

    # ------------------------------------------------------------------ startup
    def _fingerprint_sql(self, tenant: str, ids: list[int]) -> str:
        return hashlib.sha256(f"{tenant}/all/{ids}".encode()).hexdigest()[:24]

    def _index_path(self, tenant: str) -> Path | None:
        return contained_path(self.index_dir, tenant, "entries.hnsw") if self.index_dir else None

    def _load_all(self) -> None:
        groups: dict[str, list] = defaultdict(list)
        with Session(self.engine) as s:
            rows = s.execute(select(SemanticEntry.id, SemanticEntry.tenant, SemanticEntry.category,
                                    SemanticEntry.context_fp, SemanticEntry.created_at,
                                    SemanticEntry.nbytes)).all()
        for r in rows:
            groups[r.tenant].append(r)
            self._remember(r.id, r.tenant, _Meta(r.context_fp, r.created_at, r.nbytes,
                                                 r.category))
        for tenant, members in groups.items():
            ids = sorted(m.id for m in members)
            fp = self._fingerprint_sql(tenant, ids)
            path = self._index_path(tenant)
            idx = VectorIndex.load(path, fp, self.embedder.dim, self.hnsw) if path else None
            if idx is None:
                idx = self._new_index(max(1024, len(ids)))
                with Session(self.engine) as s:
                    for start in range(0, len(ids), 5000):
                        chunk = s.execute(select(SemanticEntry.id, SemanticEntry.embedding).where(
                            SemanticEntry.id.in_(ids[start:start + 5000]))).all()
                        idx.add([c.id for c in chunk],
                                np.stack([np.frombuffer(c.embedding, dtype=np.float32)
                                          for c in chunk]))
            self.indexes[tenant] = idx

    def _remember(self, entry_id: int, tenant: str, meta: _Meta) -> None:
        """The in-memory facts of one stored entry (caller adds its vector to the index)."""
        key = (tenant, meta.category)
        self.meta[entry_id] = meta
        self._owner[entry_id] = key
        self._by_context[(tenant, meta.fp)].add(entry_id)
        self.used_bytes[key] += meta.nbytes
        self.counts[key] += 1

    def _new_index(self, capacity: int = 1024) -> VectorIndex:
        return VectorIndex(self.embedder.dim, capacity, self.hnsw)

    def save_indexes(self) -> None:
        """Persist every index with a manifest of the SQL state it reflects."""
        if not self.index_dir:
            return
        with self._lock:
            for tenant, idx in self.indexes.items():
                ids = sorted(idx.ids)
                idx.save(self._index_path(tenant), self._fingerprint_sql(tenant, ids))

    # ------------------------------------------------------------------ validation
    def _check(self, req: CacheRequest) -> None:
        if not isinstance(req.text, str) or not req.text.strip():
            raise InvalidInputError("empty text: nothing to look up")
        try:
            req.text.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidInputError("text contains an unpaired UTF-16 surrogate, which is not "
                                    "valid Unicode") from None
        if len(req.text) > self.max_text_chars:
            raise InvalidInputError(
                f"text of {len(req.text)} characters exceeds the limit of {self.max_text_chars}")
        check_namespace(req.tenant)
        if req.category is not None and req.category not in self.categories:
            raise InvalidInputError(
                f"unknown category {req.category!r}; known: {', '.join(self.categories)}")

    def embed(self, text: str) -> np.ndarray:
        """Embedding of ``text``, memoised (LRU): exact repeats — the most common hits — skip
        the encoder, which dominates the hit path on a CPU."""
        key = hashlib.sha256(text.encode()).digest()
        with self._lock:
            v = self._emb_cache.get(key)
            if v is not None:
                self._emb_cache.move_to_end(key)
                return v
        v = self.embedder.embed([text])[0]
        with self._lock:
            self._emb_cache[key] = v
            if len(self._emb_cache) > self.embedding_cache_size:
                self._emb_cache.popitem(last=False)
        return v

    # ------------------------------------------------------------------ lookup
    def lookup(self, req: CacheRequest, embedding: np.ndarray | None = None) -> LookupResult:
        self._check(req)
        t0 = time.perf_counter()
        emb = self.embed(focus(req.text)) if embedding is None else embedding
        t1 = time.perf_counter()
        category = self.router.categorize(emb, req.category, req.route)
        policy = self.policies[category]
        threshold, floor, verified = self.threshold_for(req.tenant, category)
        hit = candidate = None
        covered = self._covered(req.text, category)
        if policy.cacheable and covered:
            hit, candidate = self._search(req, category, emb, threshold, floor,
                                          self.load.ttl(policy))
        dt = time.perf_counter() - t1
        with self._lock:
            st = self.stats[category]
            st.lookups += 1
            st.hits += hit is not None
            st.latencies.append(dt)
        return LookupResult(hit, category, emb, threshold, policy.cacheable and covered, dt,
                            t1 - t0, candidate if verified else None, req.tenant)

    def _covered(self, text: str, category: str) -> bool:
        if self.language_gate is None or self.language_gate.check(text).covered:
            return True
        with self._lock:
            self.stats[category].uncovered_language += 1
        return False

    def _search(self, req: CacheRequest, category: str, emb: np.ndarray, threshold: float,
                floor: float, ttl: float) -> tuple[CacheHit | None, tuple[int, float] | None]:
        """Best servable entry, and the best one within [floor, its threshold) if none is."""
        idx = self.indexes.get(req.tenant)
        if idx is None or len(idx) == 0:
            return None, None
        now = self.clock()
        k = CANDIDATES
        near = None
        with self._lock:
            same_context = list(self._by_context.get((req.tenant, req.context_fp), ()))
        exact = False
        while True:
            if exact:  # every entry of this context, scored exactly
                ids, sims = idx.exact(emb, same_context)
            else:
                ids, sims = idx.query(emb, k)
            short = len(ids) < min(k, len(idx))  # the graph could not return k live entries
            expired, best = [], None
            for i, sim in zip(ids.tolist(), sims.tolist()):
                if sim < floor:
                    break  # sorted by similarity: nothing further qualifies
                m = self.meta.get(i)
                if m is None or self._owner.get(i, ("",))[0] != req.tenant:
                    idx.delete(i)  # a label whose entry is gone or now another tenant's row
                    continue
                own = self.policies.get(m.category)
                need = threshold
                if m.category != category and own is not None:
                    # the entry's own policy applies too: the stricter threshold, its TTL
                    if not own.cacheable:
                        continue
                    need = max(need, self.threshold_for(req.tenant, m.category)[0])
                    if now - m.created_at > self.load.ttl(own):
                        expired.append(i)
                        continue
                if now - m.created_at > ttl:
                    if m.category == category:
                        expired.append(i)
                    continue
                if m.fp != req.context_fp:
                    continue
                if sim < need or sim <= self.verifier.guard(i):
                    near = near or (i, sim)
                    continue
                row = self._payload(i)
                # re-checked against the row itself before serving: a row deleted by another
                # replica, or its id handed out again (to any tenant), never answers for the
                # entry it was
                if row is None or row.tenant != req.tenant or row.context_fp != req.context_fp \
                        or abs(row.created_at - m.created_at) > 1e-3:
                    self._forget(i)
                    idx.delete(i)
                    continue
                if not same_rest(req.text, row.prompt):
                    continue  # the same question over another passage (``focus.py``)
                if self.key_guard and not keys_agree(focus(req.text), focus(row.prompt)):
                    with self._lock:
                        self.stats[category].key_refused += 1
                    continue  # another number, name, code or date: never the same answer
                best = (i, sim, row)
                break
            for i in expired:
                self._delete_ids([i], reason="expired")
            if exact or best is not None:
                break
            if k >= len(idx) or short or (len(sims) and sims[-1] < threshold):
                # graph search done; where it may have missed an entry of this context (it
                # returned fewer than asked, or every neighbour it reached was above the
                # threshold yet none was of this context), score that context exactly
                if near is None and same_context and len(same_context) <= EXACT_SCAN_MAX \
                        and (short or (len(sims) and sims[-1] >= threshold)):
                    exact = True
                    continue
                break
            k *= 4  # all close neighbours belonged to other contexts: look further
        if best is None:
            return None, near
        entry_id, sim, row = best
        hit = CacheHit(entry_id, json.loads(row.response), float(sim), category,
                       now - row.created_at, row.prompt)
        # hit counters are bookkeeping: written off the request path, many hits per transaction
        with self._lock:
            first = not self._pending_hits
            n, _ = self._pending_hits.get(entry_id, (0, now))
            self._pending_hits[entry_id] = (n + 1, now)
        if first:
            self._writer.submit(self._write_hits, HIT_WRITE_DELAY_S)
        return hit, None

    def _payload(self, entry_id: int):
        """(response, created_at, prompt) of an entry, or None if it is gone."""
        with self.engine.connect() as conn:  # Core select by primary key: no ORM overhead
            return conn.execute(_PAYLOAD, {"entry_id": entry_id}).first()

    def _write_hits(self, delay: float = 0.0) -> None:
        """Write every hit counted in the last ``delay`` seconds in one transaction: a commit
        per hit (an fsync with SQLite) on the writer thread competed with lookups for the CPU
        and doubled their latency."""
        if delay:
            self._closing.wait(delay)
        with self._lock:
            pending, self._pending_hits = self._pending_hits, {}
        if not pending:
            return
        with self.engine.begin() as conn:  # one executemany: the GIL is held briefly
            conn.execute(_HITS, [{"entry_id": i, "n": n, "last": last}
                                 for i, (n, last) in pending.items()])

    # ------------------------------------------------------------------ insert
    def insert(self, req: CacheRequest, response: dict, *, finish_reason: str = "stop",
               error: bool = False, embedding: np.ndarray | None = None,
               category: str | None = None) -> int | None:
        """Store an answer; returns its id, or None when policy or outcome forbids caching.

        Responses that errored or were cut off (finish_reason other than "stop") are never
        stored: a truncated answer served from cache would be wrong every time.
        """
        self._check(req)
        emb = self.embed(focus(req.text)) if embedding is None else embedding
        category = category or self.router.categorize(emb, req.category, req.route)
        policy = self.policies[category]
        if error or finish_reason != "stop" or not policy.cacheable or \
                not self._covered(req.text, category):
            with self._lock:
                self.stats[category].skipped += 1
            return None
        body = json.dumps(response)
        nbytes = len(body.encode())
        if nbytes > policy.max_bytes:
            with self._lock:
                self.stats[category].skipped += 1
            return None
        now = self.clock()
        key = (req.tenant, category)
        self._enforce_quota(key, policy, nbytes)
        with Session(self.engine) as s:
            row = SemanticEntry(tenant=req.tenant, category=category, context_fp=req.context_fp,
                                model=req.model, prompt=req.text, response=body,
                                embedding=emb.astype(np.float32).tobytes(), nbytes=nbytes,
                                created_at=now, last_hit_at=now, hits=0)
            s.add(row)
            s.flush()
            for d in set(req.doc_ids):
                s.add(EntryDocument(entry_id=row.id, doc_id=str(d)))
            s.commit()
            entry_id = row.id
        with self._lock:
            if entry_id in self._owner:  # an id SQL handed out again: drop what it meant before
                self._forget(entry_id)
            idx = self.indexes.get(req.tenant)
            if idx is None:
                idx = self.indexes[req.tenant] = self._new_index()
            idx.add([entry_id], emb.reshape(1, -1))
            self._remember(entry_id, req.tenant, _Meta(req.context_fp, now, nbytes, category))
            self.stats[category].inserts += 1
        return entry_id

    # ------------------------------------------------------------------ policy & stats
    def set_policy(self, category: str, values: dict) -> CategoryPolicy:
        if category not in self.categories:
            raise InvalidInputError(f"unknown category {category!r}")
        merged = {**self.policies[category].model_dump(), **values}
        pol = make_policy(merged)
        with self._lock:
            self.policies[category] = pol
        return pol

    def count(self, tenant: str | None = None) -> int:
        with Session(self.engine) as s:
            q = select(func.count(SemanticEntry.id))
            if tenant:
                q = q.where(SemanticEntry.tenant == tenant)
            return int(s.execute(q).scalar_one())

    def stats_dict(self) -> dict:
        with self._lock:
            return {c: self.stats[c].as_dict() | {"entries": sum(
                n for (t, cc), n in self.counts.items() if cc == c)}
                for c in self.categories}

    def flush(self) -> None:
        """Wait for pending bookkeeping writes (hit counters)."""
        self._writer.submit(self._write_hits).result()

    def start_sync(self, interval_s: float) -> None:
        """Poll the shared database for other replicas' entries every ``interval_s``."""
        if interval_s <= 0 or getattr(self, "_sync_thread", None) is not None:
            return
        self._sync_stop = threading.Event()

        def loop() -> None:
            while not self._sync_stop.wait(interval_s):
                try:
                    self.sync()
                except Exception:  # noqa: BLE001 - a database hiccup: try again next tick
                    log.warning("semantic sync failed", exc_info=True)

        self._sync_thread = threading.Thread(target=loop, name="semantic-sync", daemon=True)
        self._sync_thread.start()

    def close(self) -> None:
        if getattr(self, "_sync_thread", None) is not None:
            self._sync_stop.set()
            self._sync_thread.join(timeout=5)
        self._closing.set()
        self._writer.shutdown(wait=True)
        self._write_hits()
        self.save_indexes()
        self.engine.dispose()
