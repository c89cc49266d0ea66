"""Documents: ingest (chunk → precompute and store chunk KV), look up, delete.

A document's id is the hash of its text, so ingesting the same text twice is a no-op that
returns the same id (per tenant). Chunks are packed from paragraphs (then sentences, then raw
token windows) up to ``chunk_tokens`` tokens. With the embedded engine each chunk's K/V is
prefilled once, right after the default RAG prompt head, and stored — the exact layout
``/v1/rag`` asks for, so later questions over the document reuse it.
"""

from __future__ import annotations

import json
import re
import time

import xxhash
from sqlalchemy import delete, or_, select
from sqlalchemy.orm import Session

from ctxcache.errors import CtxCacheError
from ctxcache.fusion.base import FusionContext, FusionStats
from ctxcache.fusion.chunks import chunk_kv
from ctxcache.kv.keys import PUBLIC_NAMESPACE
from ctxcache.semantic.models import Document
from ctxcache.service.backends import rag_template

DEFAULT_RAG_SYSTEM = ("You answer questions using the passages given. If the passages do not "
                      "contain the answer, say so.")


class UnknownDocumentError(CtxCacheError, LookupError):
    """A document id this tenant cannot see."""


class IngestCancelled(CtxCacheError):
    """The client left while its documents were being ingested (nothing was stored)."""


def split_chunks(text: str, count, chunk_tokens: int) -> list[str]:
    """Pack paragraphs (then sentences, then word windows) into chunks of ≤ chunk_tokens."""
    units: list[str] = []
    for para in re.split(r"\n\s*\n", text.strip()):
        para = para.strip()
        if not para:
            continue
        if count(para) <= chunk_tokens:
            units.append(para)
            continue
        for sent in re.split(r"(?<=[.!?])\s+", para):
            if count(sent) <= chunk_tokens:
                units.append(sent)
                continue
            words, cur = sent.split(), []
            for w in words:
                if cur and count(" ".join(cur + [w])) > chunk_tokens:
                    units.append(" ".join(cur))
                    cur = []
                cur.append(w)
            if cur:
                units.append(" ".join(cur))
    chunks: list[str] = []
    cur = ""
    for u in units:
        cand = f"{cur}\n\n{u}" if cur else u
        if cur and count(cand) > chunk_tokens:
            chunks.append(cur)
            cur = u
        else:
            cur = cand
    if cur:
        chunks.append(cur)
    return chunks


class DocumentService:
    def __init__(self, db, backend, store=None, chunk_tokens: int = 256,
                 system: str = DEFAULT_RAG_SYSTEM):
        self.db = db
        self.backend = backend
        self.store = store
        self.chunk_tokens = chunk_tokens
        self.system = system

    def _count(self):
        engine = getattr(self.backend, "engine", None)
        if engine is not None and engine.tokenizer is not None:
            return lambda s: len(engine.tokenizer.encode(s, add_special_tokens=False))
        return lambda s: max(1, len(s) // 4)  # no local tokenizer (SGLang): ~4 chars a token

    def ingest(self, tenant: str, text: str, title: str | None, meta: dict,
               public: bool = False, should_stop=None) -> dict:
        doc_id = xxhash.xxh3_128_hexdigest(text.encode())[:32]
        owner = PUBLIC_NAMESPACE if public else tenant
        with Session(self.db) as s:
            row = s.get(Document, (doc_id, owner))
            if row is not None:
                return {"id": doc_id, "chunks": len(json.loads(row.chunks)),
                        "tokens": row.tokens, "created": False, "public": row.public}
        count = self._count()
        chunks = split_chunks(text, count, self.chunk_tokens)
        tokens = sum(count(c) for c in chunks)
        self._precompute(owner, chunks, should_stop)
        with Session(self.db) as s:
            if s.get(Document, (doc_id, owner)) is None:
                s.add(Document(id=doc_id, tenant=owner, title=title or "", text=text,
                               chunks=json.dumps(chunks), meta=json.dumps(meta), tokens=tokens,
                               public=public, created_at=time.time(),
                               publisher=tenant if public else None))
                s.commit()
        return {"id": doc_id, "chunks": len(chunks), "tokens": tokens, "created": True,
                "public": public}

    def _precompute(self, namespace: str, chunks: list[str], should_stop=None) -> None:
        engine = getattr(self.backend, "engine", None)
        if engine is None or self.store is None:
            return  # remote backend: the server's own prefix cache does the work
        ctx = FusionContext(engine, self.store, namespace)
        stats = FusionStats("ingest")
        head, _, _ = rag_template(engine, self.system)
        pkey, pkv = chunk_kv(ctx, head, stats)
        for c in chunks:
            if should_stop is not None and should_stop():
                raise IngestCancelled("ingestion cancelled: the client went away")
            chunk_kv(ctx, engine.encode(c.rstrip() + "\n\n"), stats, prefix=pkv, prefix_key=pkey)

    def _visible(self, tenant: str):
        return or_(Document.tenant == tenant, Document.tenant == PUBLIC_NAMESPACE)

    def get(self, tenant: str, doc_id: str) -> dict:
        with Session(self.db) as s:
            row = s.execute(select(Document).where(Document.id == doc_id, self._visible(tenant))
                            ).scalars().first()
            if row is None:
                raise UnknownDocumentError(f"unknown document {doc_id!r}")
            return {"id": row.id, "title": row.title, "chunks": len(json.loads(row.chunks)),
                    "tokens": row.tokens, "metadata": json.loads(row.meta),
                    "public": row.public, "created_at": row.created_at}

    def chunks(self, tenant: str, doc_ids: list[str]) -> list[str]:
        out: list[str] = []
        with Session(self.db) as s:
            for d in doc_ids:
                row = s.execute(select(Document).where(Document.id == d, self._visible(tenant))
                                ).scalars().first()
                if row is None:
                    raise UnknownDocumentError(f"unknown document {d!r}")
                out.extend(json.loads(row.chunks))
        return out

    def list(self, tenant: str) -> list[dict]:
        with Session(self.db) as s:
            rows = s.execute(select(Document).where(self._visible(tenant))).scalars().all()
            return [{"id": r.id, "title": r.title, "tokens": r.tokens, "public": r.public}
                    for r in rows]

    def delete(self, tenant: str, doc_id: str, admin: bool = False) -> dict:
        """Remove the document, its chunk caches and semantic entries that depend on it.

        A tenant deletes its own documents and the public ones it published; the admin key
        any public document (the public namespace belongs to the gateway, not to a tenant)."""
        with Session(self.db) as s:
            row = s.get(Document, (doc_id, tenant))
            if row is None:
                pub = s.get(Document, (doc_id, PUBLIC_NAMESPACE))
                if pub is not None and (admin or pub.publisher == tenant):
                    row = pub
            if row is None:
                raise UnknownDocumentError(f"unknown document {doc_id!r}")
            owner = row.tenant
            chunks = json.loads(row.chunks)
            s.execute(delete(Document).where(Document.id == doc_id, Document.tenant == owner))
            s.commit()
        tenant = owner
        removed = 0
        engine = getattr(self.backend, "engine", None)
        if engine is not None and self.store is not None:
            head, _, _ = rag_template(engine, self.system)
            pkey = self.store.key_for(engine.fingerprint, head)
            for c in chunks:
                ids = engine.encode(c.rstrip() + "\n\n")
                for prefix in (pkey, None):
                    removed += self.store.delete(self.store.key_for(engine.fingerprint, ids,
                                                                    prefix), tenant)
        return {"id": doc_id, "deleted": True, "kv_entries_removed": removed,
                "public": owner == PUBLIC_NAMESPACE}
