"""Keeping the semantic cache within bounds and consistent: quotas, deletes, invalidation by
id / tenant / category / document, TTL purges, and bulk imports."""

from __future__ import annotations

import json
from typing import Iterable, Sequence

import numpy as np
from sqlalchemy import delete, insert, select
from sqlalchemy.orm import Session

from ctxcache.errors import InvalidInputError
from ctxcache.kv.keys import check_namespace
from ctxcache.semantic.models import EntryDocument, SemanticEntry
from ctxcache.semantic.policy import CategoryPolicy
from ctxcache.semantic.types import _Meta


SYNC_LAG_IDS = 1024  # ids below the highest seen that may still commit late (other writers)


class Maintenance:
    """Mixed into ``SemanticCache`` (uses its engine, indexes, metadata and locks)."""

    _sync_floor: int = 0

    def sync(self) -> int:
        """Learn the entries other replicas wrote to the shared database since the last sync;
        returns how many were added to this replica's indexes.

        SQL is the source of truth; each replica's HNSW index is a view of it. Inserts are
        found by id above a watermark (kept ``SYNC_LAG_IDS`` below the highest id seen, since a
        transaction with a lower id can commit after a higher one). Deletes need no pass:
        a hit is re-read by primary key before it is served, and a row gone underneath is
        forgotten there."""
        floor = self._sync_floor
        with Session(self.engine) as s:
            rows = s.execute(select(
                SemanticEntry.id, SemanticEntry.tenant, SemanticEntry.category,
                SemanticEntry.context_fp, SemanticEntry.created_at, SemanticEntry.nbytes,
                SemanticEntry.embedding).where(SemanticEntry.id > floor)).all()
        added = 0
        with self._lock:
            for r in rows:
                m = self.meta.get(r.id)
                if m is not None:
                    if self._owner.get(r.id) == (r.tenant, r.category) and \
                            abs(m.created_at - r.created_at) <= 1e-3:
                        continue
                    self._forget(r.id)  # the id was reused for another row
                idx = self.indexes.get(r.tenant)
                if idx is None:
                    idx = self.indexes[r.tenant] = self._new_index()
                idx.add([r.id], np.frombuffer(r.embedding, dtype=np.float32).reshape(1, -1))
                self._remember(r.id, r.tenant, _Meta(r.context_fp, r.created_at, r.nbytes,
                                                     r.category))
                added += 1
            top = max([floor + SYNC_LAG_IDS] + [r.id for r in rows])
            self._sync_floor = max(floor, top - SYNC_LAG_IDS)
        return added

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
                for i in ids:
                    if i in self._owner:
                        self._forget(i)
                idx = self.indexes.get(tenant)
                if idx is None:
                    idx = self.indexes[tenant] = self._new_index(len(prompts))
                idx.add(ids, embeddings[start:start + len(ids)])
                for i, r in zip(ids, rows):
                    self._remember(i, tenant, _Meta(context_fp, now, r["nbytes"], category))
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
        self.verifier.forget_entry(entry_id)
        with self._lock:
            key = self._owner.pop(entry_id, None)
            m = self.meta.pop(entry_id, None)
            if key is not None and m is not None:
                group = self._by_context.get((key[0], m.fp))
                if group is not None:
                    group.discard(entry_id)
                    if not group:
                        del self._by_context[(key[0], m.fp)]
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
                   category: str | None = None, doc_id: str | None = None,
                   context_fp: str | None = None) -> int:
        """Delete entries matching all the given filters (at least one is required)."""
        if entry_id is None and tenant is None and category is None and doc_id is None \
                and context_fp is None:
            raise InvalidInputError("invalidate needs an id, tenant, category, document or "
                                    "context")
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
        if context_fp is not None:
            q = q.where(SemanticEntry.context_fp == context_fp)
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
