"""Every example runs, as a user would run it, against a real ``ctxcache serve``: the plain
HTTP / openai ones always, the LangChain / LlamaIndex / LangGraph ones when their adapter
packages are installed (the test command installs them)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# example → (modules it needs, text its output must contain)
CASES = {
    "openai_chat.py": ((), "Paris"),
    "rag_rest.py": ((), "reused"),
    "agents_team.py": ((), "reused"),
    "agents_python.py": ((), "shared tokens reused"),
    "langchain_chain.py": (("langchain_ctxcache",), "rag:"),
    "llamaindex_query.py": (("llama_index.llms.ctxcache",), "reused"),
    "langgraph_team.py": (("langchain_ctxcache", "langgraph"), "[critic]"),
}


def _missing(modules) -> list[str]:
    out = []
    for m in modules:
        try:
            if importlib.util.find_spec(m) is None:
                out.append(m)
        except ModuleNotFoundError:
            out.append(m)
    return out


@pytest.fixture(scope="module")
def gateway():
    testing = pytest.importorskip("ctxcache_client.testing")
    with testing.live_gateway() as url:
        yield url


@pytest.mark.parametrize("name", sorted(CASES))
def test_example_runs(name, gateway):
    needs, expect = CASES[name]
    missing = _missing(needs)
    if missing:
        pytest.skip(f"adapter not installed: {missing}")
    env = {**os.environ, "CTXCACHE_URL": gateway, "CTXCACHE_BASE_URL": gateway + "/v1"}
    r = subprocess.run([sys.executable, str(EXAMPLES / name)], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert expect in r.stdout, r.stdout[-3000:]
