"""A real gateway for integration tests: ``live_gateway()`` starts ``ctxcache serve`` (the
same command a user runs) on a free port with a throw-away data dir and waits until it is
ready — or, when ``CTXCACHE_TEST_URL`` is set, uses that running gateway instead (so a test
run of several packages starts one server)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Iterator

import httpx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout_s: float = 300.0, proc: subprocess.Popen | None = None) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"ctxcache serve exited with {proc.returncode}")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"gateway at {url} not ready after {timeout_s:.0f}s")


@contextlib.contextmanager
def live_gateway(env: dict[str, str] | None = None, timeout_s: float = 300.0) -> Iterator[str]:
    """Yield the root URL of a ready gateway (no ``/v1``)."""
    given = os.environ.get("CTXCACHE_TEST_URL")
    if given:
        wait_ready(given.rstrip("/"), timeout_s)
        yield given.rstrip("/")
        return
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="ctxcache-gw-") as data:
        full_env = {**os.environ, "CTXCACHE_DATA_DIR": data, "CTXCACHE_COST_MODEL": "off",
                    "CTXCACHE_DATABASE_URL": f"sqlite:///{data}/gateway.db", **(env or {})}
        log = open(os.path.join(data, "serve.log"), "w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "ctxcache.cli", "serve", "--port", str(port),
             "--log-level", "warning"], env=full_env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            try:
                wait_ready(url, timeout_s, proc)
            except RuntimeError:
                log.flush()
                with open(log.name) as f:
                    sys.stderr.write(f.read()[-4000:])
                raise
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
