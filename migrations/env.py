"""Alembic environment: uses the connection handed over by ``ctxcache.db.migrate`` or, from the
alembic CLI, the URL in ``CTXCACHE_DATABASE_URL`` (default: the local SQLite file)."""

from __future__ import annotations

import os

from alembic import context

from ctxcache.semantic.models import Base

target_metadata = Base.metadata
config = context.config


def run() -> None:
    conn = config.attributes.get("connection")
    if conn is not None:
        context.configure(connection=conn, target_metadata=target_metadata,
                          render_as_batch=conn.dialect.name == "sqlite")
        with context.begin_transaction():
            context.run_migrations()
        return
    from ctxcache.db import make_engine

    engine = make_engine(os.environ.get("CTXCACHE_DATABASE_URL"))
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata,
                          render_as_batch=connection.dialect.name == "sqlite")
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


run()
