"""SQL database access: engine creation and schema migrations (Alembic).

SQLite by default (a file under the cache dir), PostgreSQL in production
(``postgresql+psycopg2://...``). The schema is owned by the Alembic migrations shipped in the
package (``ctxcache.migrations``); ``migrate(url)`` brings any database to the latest revision,
so a fresh deployment and an upgrade take the same path.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine

from ctxcache.engine.models import cache_dir



def migrations_dir() -> Path:
    """Where the Alembic scripts are (top-level ``migrations/``, installed as a subpackage)."""
    import importlib.util

    spec = importlib.util.find_spec("ctxcache.migrations")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("ctxcache.migrations is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def default_url() -> str:
    path = cache_dir() / "ctxcache.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def make_engine(url: str | None = None) -> Engine:
    url = url or default_url()
    if url.startswith("sqlite"):
        eng = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(eng, "connect")
        def _pragmas(dbapi_conn, _):  # noqa: ANN001 - DB-API connection
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return eng
    # pre-ping: a connection broken by a database restart is replaced, not handed out;
    # a short connect timeout: while the database is down, requests degrade instead of hanging
    args = {"connect_timeout": 3} if url.startswith("postgresql") else {}
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20,
                         pool_timeout=5, connect_args=args)


def migrate(engine: Engine) -> None:
    """Upgrade the database behind ``engine`` to the newest schema revision."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
