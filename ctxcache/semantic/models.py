"""SQLAlchemy models: the payload side of the semantic cache (vectors live in HNSW, in memory).

The schema is created and evolved by the Alembic migrations in ``migrations/``; these classes
mirror it for the ORM.
"""

from __future__ import annotations

from sqlalchemy import Boolean, Float, ForeignKey, Integer, LargeBinary, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class SemanticEntry(Base):
    __tablename__ = "semantic_entries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant: Mapped[str] = mapped_column(String(64))
    category: Mapped[str] = mapped_column(String(32))
    context_fp: Mapped[str] = mapped_column(String(64), default="")
    model: Mapped[str] = mapped_column(String(256), default="")
    prompt: Mapped[str] = mapped_column(Text)
    response: Mapped[str] = mapped_column(Text)  # JSON
    embedding: Mapped[bytes] = mapped_column(LargeBinary)  # float32 bytes
    nbytes: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[float] = mapped_column(Float)
    last_hit_at: Mapped[float] = mapped_column(Float)
    hits: Mapped[int] = mapped_column(Integer, default=0)


class EntryDocument(Base):
    __tablename__ = "semantic_entry_docs"

    entry_id: Mapped[int] = mapped_column(
        Integer, ForeignKey("semantic_entries.id", ondelete="CASCADE"), primary_key=True)
    doc_id: Mapped[str] = mapped_column(String(128), primary_key=True)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    tenant: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(128), default="")
    rate_limit_per_min: Mapped[int] = mapped_column(Integer, default=600)
    created_at: Mapped[float] = mapped_column(Float)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


class Document(Base):
    __tablename__ = "documents"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), primary_key=True)
    title: Mapped[str] = mapped_column(String(512), default="")
    text: Mapped[str] = mapped_column(Text)
    chunks: Mapped[str] = mapped_column(Text)  # JSON list of chunk texts
    meta: Mapped[str] = mapped_column(Text, default="{}")
    tokens: Mapped[int] = mapped_column(Integer, default=0)
    public: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[float] = mapped_column(Float)
    publisher: Mapped[str | None] = mapped_column(String(64), nullable=True, default=None)
