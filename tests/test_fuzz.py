"""API fuzzing with schemathesis over the gateway's own OpenAPI schema, every operation, with
and without auth: no server errors, every status code and content type documented, every
documented error in the OpenAI error shape. Bounded (examples per operation) so CI stays fast;
``CTXCACHE_FUZZ_EXAMPLES`` raises the bound for a longer run."""

import os

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import checks  # noqa: E402

from ctxcache.service.app import create_app  # noqa: E402
from test_service import ADMIN, make_gateway  # noqa: E402

EXAMPLES = int(os.environ.get("CTXCACHE_FUZZ_EXAMPLES", "12"))
CHECKS = [checks.not_a_server_error, checks.status_code_conformance,
          checks.content_type_conformance, checks.response_schema_conformance]


def make_app(mode: str, engine, embedder, tmp):
    """An open gateway or one that requires keys; max_tokens capped so fuzzed generations stay
    short (larger requests are 400s, which is part of what is checked). One per test: the ASGI
    test transport runs the app's shutdown when it is done with it."""
    extra = {"auth": "required", "admin_key": ADMIN} if mode in ("auth", "pg") else {}
    if mode == "pg":
        extra["database_url"] = pg_url()
    return create_app(gateway=make_gateway(tmp, engine, embedder, max_tokens_limit=8, **extra))


def pg_url() -> str:
    """The local PostgreSQL (CI runs one), or skip: the same fuzzing on the production
    database, where NUL bytes and other text SQLite stores could fail."""
    url = os.environ.get("CTXCACHE_TEST_PG", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
    try:
        import sqlalchemy

        sqlalchemy.create_engine(url, connect_args={"connect_timeout": 3}).connect().close()
    except Exception as e:  # noqa: BLE001 - no server here
        pytest.skip(f"PostgreSQL not reachable: {type(e).__name__}")
    return url


@pytest.fixture(scope="module")
def embedder_for_fuzz():
    from ctxcache.semantic import TransformerEmbedder

    return TransformerEmbedder()


@pytest.mark.parametrize("mode,headers", [
    ("open", {}),
    ("auth", {}),  # no key: documented 401s
    ("auth", {"Authorization": "Bearer wrong-key"}),
    ("auth", {"Authorization": f"Bearer {ADMIN}"}),
    ("pg", {"Authorization": f"Bearer {ADMIN}"}),
])
def test_fuzz_every_operation(engine, embedder_for_fuzz, tmp_path, mode, headers):
    app = make_app(mode, engine, embedder_for_fuzz, tmp_path)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    tried, failures = 0, {}
    for result in schema.get_all_operations():
        op = result.ok()

        @given(op.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case):
            nonlocal tried
            tried += 1
            case.call_and_validate(headers=headers, checks=CHECKS)

        try:
            run()
        except Exception as e:  # noqa: BLE001 - collected per operation, reported together
            failures[f"{op.method.upper()} {op.path}"] = str(e)[:1500]
    print(f"fuzz {mode} {headers.get('Authorization', 'no key')[:12]}: {tried} requests, "
          f"{len(failures)} operations failing")
    assert tried >= 20 * EXAMPLES // 4  # every operation generated cases
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())
