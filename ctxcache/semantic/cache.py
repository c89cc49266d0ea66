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
import random
import threading
import time
from collections import OrderedDict, defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.orm import Session

from ctxcache.db import make_engine, migrate
from ctxcache.errors import InvalidInputError
from ctxcache.kv.keys import check_namespace
from ctxcache.semantic.classifier import (
    DEFAULT_CATEGORIES, CategoryRouter, CentroidClassifier, load_examples, load_trained,
)
from ctxcache.semantic.embedder import Embedder
from ctxcache.semantic.index import VectorIndex
from ctxcache.semantic.models import EntryDocument, SemanticEntry
from ctxcache.semantic.policy import CategoryPolicy, LoadAdapter, default_policies, make_policy

MAX_TEXT_CHARS = 32_000
CANDIDATES = 8


def context_fingerprint(*, documents: Sequence[str] = (), agent_id: str | None = None,
                        temperature: float = 0.0, tools: object = None, model: str = "",
                        system: str | None = None) -> str:
    """Hash of everything besides the question that changes the answer.

    Requests with different fingerprints never share an entry: same question over other
    documents, for another agent, with sampling, or with tools is a different request.
    """
    payload = json.dumps({"docs": list(documents), "agent": agent_id,
                          "temperature": round(float(temperature), 4), "tools": tools,
                          "model": model, "system": system}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


@dataclass
class CacheRequest:
    text: str
    tenant: str = "default"
    category: str | None = None
    route: str | None = None
    context_fp: str = ""
    model: str = ""
    doc_ids: Sequence[str] = ()


@dataclass
class CacheHit:
    entry_id: int
    response: dict
    similarity: float
    category: str
    age_s: float
    prompt: str


@dataclass
class LookupResult:
    hit: CacheHit | None
    category: str
    embedding: np.ndarray
    threshold: float
    cacheable: bool
    latency_s: float  # index + SQL time (embedding excluded)
    embed_s: float


@dataclass
class CategoryStats:
    lookups: int = 0
    hits: int = 0
    inserts: int = 0
    evictions: int = 0
    expired: int = 0
    skipped: int = 0  # not cacheable / errored / truncated responses
    verified: int = 0
    false_hits: int = 0
    latencies: deque = field(default_factory=lambda: deque(maxlen=2000))

    def as_dict(self) -> dict:
        lat = sorted(self.latencies)
        pct = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1e3 if lat else None)
        return {"lookups": self.lookups, "hits": self.hits,
                "hit_rate": self.hits / self.lookups if self.lookups else 0.0,
                "inserts": self.inserts, "evictions": self.evictions, "expired": self.expired,
                "skipped": self.skipped, "verified": self.verified, "false_hits": self.false_hits,
                "false_hit_rate_estimate": self.false_hits / self.verified if self.verified else None,
                "latency_ms_p50": pct(0.5), "latency_ms_p99": pct(0.99)}


@dataclass
class _Meta:
    fp: str
    created_at: float
    nbytes: int
    category: str = "other"


class SemanticCache:
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
    ):
        self.embedder = embedder
        self.categories = list(categories)
        self.policies = policies or default_policies()
        for c in self.categories:
            self.policies.setdefault(c, make_policy({}))
        self.clock = clock
        self.load = load_adapter or LoadAdapter(enabled=False)
        self.verify_rate = verify_rate
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
        self._lock = threading.RLock()
        self._rng = random.Random(seed)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="semantic-hits")
        self._emb_cache: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self.embedding_cache_size = embedding_cache_size
        self._load_all()

    # ------------------------------------------------------------------ startup
    def _fingerprint_sql(self, tenant: str, ids: list[int]) -> str:
        return hashlib.sha256(f"{tenant}/all/{ids}".encode()).hexdigest()[:24]

    def _index_path(self, tenant: str) -> Path | None:
        return self.index_dir / tenant / "entries.hnsw" if self.index_dir else None

    def _load_all(self) -> None:
        groups: dict[str, list] = defaultdict(list)
        with Session(self.engine) as s:
            rows = s.execute(select(SemanticEntry.id, SemanticEntry.tenant, SemanticEntry.category,
                                    SemanticEntry.context_fp, SemanticEntry.created_at,
                                    SemanticEntry.nbytes)).all()
        for r in rows:
            groups[r.tenant].append(r)
            self.meta[r.id] = _Meta(r.context_fp, r.created_at, r.nbytes, r.category)
            self._owner[r.id] = (r.tenant, r.category)
            self.used_bytes[(r.tenant, r.category)] += r.nbytes
            self.counts[(r.tenant, r.category)] += 1
        for tenant, members in groups.items():
            ids = sorted(m.id for m in members)
            fp = self._fingerprint_sql(tenant, ids)
            path = self._index_path(tenant)
            idx = VectorIndex.load(path, fp, self.embedder.dim) if path else None
            if idx is None:
                idx = VectorIndex(self.embedder.dim, capacity=max(1024, len(ids)))
                with Session(self.engine) as s:
                    for start in range(0, len(ids), 5000):
                        chunk = s.execute(select(SemanticEntry.id, SemanticEntry.embedding).where(
                            SemanticEntry.id.in_(ids[start:start + 5000]))).all()
                        idx.add([c.id for c in chunk],
                                np.stack([np.frombuffer(c.embedding, dtype=np.float32)
                                          for c in chunk]))
            self.indexes[tenant] = idx

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
        emb = self.embed(req.text) if embedding is None else embedding
        t1 = time.perf_counter()
        category = self.router.categorize(emb, req.category, req.route)
        policy = self.policies[category]
        threshold = self.load.threshold(policy)
        hit = None
        if policy.cacheable:
            hit = self._search(req, category, emb, threshold, self.load.ttl(policy))
        dt = time.perf_counter() - t1
        with self._lock:
            st = self.stats[category]
            st.lookups += 1
            st.hits += hit is not None
            st.latencies.append(dt)
        return LookupResult(hit, category, emb, threshold, policy.cacheable, dt, t1 - t0)

    def _search(self, req: CacheRequest, category: str, emb: np.ndarray, threshold: float,
                ttl: float) -> CacheHit | None:
        idx = self.indexes.get(req.tenant)
        if idx is None or len(idx) == 0:
            return None
        now = self.clock()
        k = CANDIDATES
        while True:
            ids, sims = idx.query(emb, k)
            expired, best = [], None
            for i, sim in zip(ids.tolist(), sims.tolist()):
                if sim < threshold:
                    break  # sorted by similarity: nothing further qualifies
                m = self.meta.get(i)
                if m is None:
                    continue
                own = self.policies.get(m.category)
                if m.category != category and own is not None:
                    # the entry's own policy applies too: the stricter threshold, its TTL
                    if not own.cacheable or sim < self.load.threshold(own):
                        continue
                    if now - m.created_at > self.load.ttl(own):
                        expired.append(i)
                        continue
                if now - m.created_at > ttl:
                    if m.category == category:
                        expired.append(i)
                    continue
                if m.fp != req.context_fp:
                    continue
                best = (i, sim)
                break
            for i in expired:
                self._delete_ids([i], reason="expired")
            if best is not None or k >= len(idx) or (len(sims) and sims[-1] < threshold):
                break
            k *= 4  # all close neighbours belonged to other contexts: look further
        if best is None:
            return None
        entry_id, sim = best
        with self.engine.connect() as conn:  # Core select by primary key: no ORM overhead
            row = conn.execute(select(SemanticEntry.response, SemanticEntry.created_at,
                                      SemanticEntry.prompt).where(SemanticEntry.id == entry_id)
                               ).first()
        if row is None:  # deleted by another replica
            self._forget(entry_id)
            return None
        hit = CacheHit(entry_id, json.loads(row.response), float(sim), category,
                       now - row.created_at, row.prompt)
        # hit counters are bookkeeping: written off the request path
        self._writer.submit(self._record_hit, entry_id, now)
        return hit

    def _record_hit(self, entry_id: int, now: float) -> None:
        with Session(self.engine) as s:
            s.execute(update(SemanticEntry).where(SemanticEntry.id == entry_id).values(
                hits=SemanticEntry.hits + 1, last_hit_at=now))
            s.commit()

    # ------------------------------------------------------------------ insert
    def insert(self, req: CacheRequest, response: dict, *, finish_reason: str = "stop",
               error: bool = False, embedding: np.ndarray | None = None,
               category: str | None = None) -> int | None:
        """Store an answer; returns its id, or None when policy or outcome forbids caching.

        Responses that errored or were cut off (finish_reason other than "stop") are never
        stored: a truncated answer served from cache would be wrong every time.
        """
        self._check(req)
        emb = self.embed(req.text) if embedding is None else embedding
        category = category or self.router.categorize(emb, req.category, req.route)
        policy = self.policies[category]
        if error or finish_reason != "stop" or not policy.cacheable:
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
            idx = self.indexes.get(req.tenant)
            if idx is None:
                idx = self.indexes[req.tenant] = VectorIndex(self.embedder.dim)
            idx.add([entry_id], emb.reshape(1, -1))
            self.meta[entry_id] = _Meta(req.context_fp, now, nbytes, category)
            self._owner[entry_id] = key
            self.used_bytes[key] += nbytes
            self.counts[key] += 1
            self.stats[category].inserts += 1
        return entry_id

    def bulk_load(self, tenant: str, category: str, prompts: Sequence[str],
                  embeddings: np.ndarray, responses: Sequence[dict], context_fp: str = "",
                  batch: int = 20_000) -> int:
        """Import many entries at once (warm-up, migration, benchmarks); quotas not enforced."""
        check_namespace(tenant)
        if category not in self.categories:
            raise InvalidInputError(f"unknown category {category!r}")
        if not (len(prompts) == len(embeddings) == len(responses)):
            raise InvalidInputError("prompts, embeddings and responses must have equal length")
        now = self.clock()
        key = (tenant, category)
        total = 0
        for start in range(0, len(prompts), batch):
            rows = []
            for i in range(start, min(start + batch, len(prompts))):
                body = json.dumps(responses[i])
                rows.append(dict(tenant=tenant, category=category, context_fp=context_fp,
                                 model="", prompt=prompts[i], response=body,
                                 embedding=embeddings[i].astype(np.float32).tobytes(),
                                 nbytes=len(body), created_at=now, last_hit_at=now, hits=0))
            with Session(self.engine) as s:
                ids = list(s.scalars(
                    insert(SemanticEntry).returning(SemanticEntry.id, sort_by_parameter_order=True),
                    rows))
                s.commit()
            with self._lock:
                idx = self.indexes.get(tenant)
                if idx is None:
                    idx = self.indexes[tenant] = VectorIndex(self.embedder.dim,
                                                             capacity=len(prompts))
                idx.add(ids, embeddings[start:start + len(ids)])
                for i, r in zip(ids, rows):
                    self.meta[i] = _Meta(context_fp, now, r["nbytes"], category)
                    self._owner[i] = key
                    self.used_bytes[key] += r["nbytes"]
                    self.counts[key] += 1
                self.stats[category].inserts += len(ids)
            total += len(ids)
        return total

    def _enforce_quota(self, key: tuple[str, str], policy: CategoryPolicy, incoming: int) -> None:
        n = self.counts[key]
        over_n = n + 1 - policy.max_entries
        over_b = self.used_bytes[key] + incoming - policy.max_bytes
        if over_n <= 0 and over_b <= 0:
            return
        self.flush()  # eviction order depends on up-to-date last-hit times
        victims: list[int] = []
        freed = 0
        with Session(self.engine) as s:
            q = (select(SemanticEntry.id, SemanticEntry.nbytes)
                 .where(SemanticEntry.tenant == key[0], SemanticEntry.category == key[1])
                 .order_by(SemanticEntry.last_hit_at, SemanticEntry.id))
            for r in s.execute(q):
                if len(victims) >= max(over_n, 0) and freed >= max(over_b, 0):
                    break
                victims.append(r.id)
                freed += r.nbytes
        self._delete_ids(victims, reason="evicted")

    # ------------------------------------------------------------------ deletes
    def _forget(self, entry_id: int) -> tuple[str, str] | None:
        with self._lock:
            key = self._owner.pop(entry_id, None)
            m = self.meta.pop(entry_id, None)
            if key is not None:
                idx = self.indexes.get(key[0])
                if idx is not None:
                    idx.delete(entry_id)
                self.counts[key] -= 1
                if m is not None:
                    self.used_bytes[key] -= m.nbytes
            return key

    def _delete_ids(self, ids: Iterable[int], reason: str = "invalidated") -> int:
        ids = list(ids)
        if not ids:
            return 0
        with Session(self.engine) as s:
            for start in range(0, len(ids), 500):
                part = ids[start:start + 500]
                s.execute(delete(EntryDocument).where(EntryDocument.entry_id.in_(part)))
                s.execute(delete(SemanticEntry).where(SemanticEntry.id.in_(part)))
            s.commit()
        for i in ids:
            key = self._forget(i)
            if key is not None:
                with self._lock:
                    st = self.stats[key[1]]
                    if reason == "expired":
                        st.expired += 1
                    elif reason == "evicted":
                        st.evictions += 1
        return len(ids)

    def invalidate(self, *, entry_id: int | None = None, tenant: str | None = None,
                   category: str | None = None, doc_id: str | None = None) -> int:
        """Delete entries matching all the given filters (at least one is required)."""
        if entry_id is None and tenant is None and category is None and doc_id is None:
            raise InvalidInputError("invalidate needs an id, tenant, category or document")
        if category is not None and category not in self.categories:
            raise InvalidInputError(f"unknown category {category!r}")
        if tenant is not None:
            check_namespace(tenant)
        q = select(SemanticEntry.id)
        if entry_id is not None:
            q = q.where(SemanticEntry.id == entry_id)
        if tenant is not None:
            q = q.where(SemanticEntry.tenant == tenant)
        if category is not None:
            q = q.where(SemanticEntry.category == category)
        if doc_id is not None:
            q = q.where(SemanticEntry.id.in_(
                select(EntryDocument.entry_id).where(EntryDocument.doc_id == str(doc_id))))
        with Session(self.engine) as s:
            ids = [r[0] for r in s.execute(q)]
        return self._delete_ids(ids)

    def purge_expired(self) -> int:
        now = self.clock()
        expired = []
        with self._lock:
            for i, m in list(self.meta.items()):
                cat = self._owner[i][1]
                if now - m.created_at > self.load.ttl(self.policies[cat]):
                    expired.append(i)
        return self._delete_ids(expired, reason="expired")

    # ------------------------------------------------------------------ policy & stats
    def set_policy(self, category: str, values: dict) -> CategoryPolicy:
        if category not in self.categories:
            raise InvalidInputError(f"unknown category {category!r}")
        merged = {**self.policies[category].model_dump(), **values}
        pol = make_policy(merged)
        with self._lock:
            self.policies[category] = pol
        return pol

    def should_verify(self) -> bool:
        return self.verify_rate > 0 and self._rng.random() < self.verify_rate

    def record_verification(self, category: str, consistent: bool) -> None:
        """Outcome of re-answering a hit freshly (sampled): feeds the false-hit estimate."""
        with self._lock:
            st = self.stats[category]
            st.verified += 1
            st.false_hits += not consistent

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
        self._writer.submit(lambda: None).result()

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        self.save_indexes()
        self.engine.dispose()
