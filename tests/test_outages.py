"""PostgreSQL and Redis stopped and restarted under traffic (private instances on free ports,
so the machine's own services are untouched). The gateway must keep answering from the backend
while they are down — semantic cache skipped, Redis tier skipped, document routes 503 with
Retry-After — and use them again once they are back, without a restart."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from test_service import free_port


class PrivateRedis:
    def __init__(self):
        if not shutil.which("redis-server"):
            pytest.skip("redis-server not installed")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--save", "",
                                      "--appendonly", "no"], stdout=subprocess.DEVNULL)
        _wait_port(self.port)

    def stop(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


class PrivatePostgres:
    """initdb + pg_ctl in a temp dir (as the ``postgres`` user when running as root)."""

    def __init__(self):
        if not (shutil.which("initdb") and shutil.which("pg_ctl")):
            pytest.skip("PostgreSQL server binaries not installed")
        self.port = free_port()
        # its own top-level temp dir: the postgres user cannot enter pytest's private tmp
        self.dir = Path(tempfile.mkdtemp(prefix="ctxcache-pg-"))
        self.as_postgres = os.geteuid() == 0
        if self.as_postgres:
            shutil.chown(self.dir, "postgres")
        r = self._run(f"initdb -D {self.dir} -A trust -U postgres")
        if r.returncode != 0:
            pytest.skip(f"initdb failed: {r.stderr[-300:]}")
        self.url = f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, cmd: str):
        full = ["su", "postgres", "-c", cmd] if self.as_postgres else ["bash", "-c", cmd]
        return subprocess.run(full, capture_output=True, text=True, timeout=120)

    def start(self):
        r = self._run(f"pg_ctl -D {self.dir} -l {self.dir}/log -w -o "
                      f"'-p {self.port} -k {self.dir} -h 127.0.0.1' start")
        assert r.returncode == 0, r.stderr

    def stop(self):
        self._run(f"pg_ctl -D {self.dir} -m immediate -w stop")

    def remove(self):
        shutil.rmtree(self.dir, ignore_errors=True)


def _wait_port(port: int, timeout: float = 30) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"port {port} not open")


def chat(url: str, q: str) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json={
        "model": "default", "messages": [{"role": "user", "content": q}], "max_tokens": 48},
        timeout=300)


@pytest.mark.slow
def test_database_and_redis_outage_degrades_and_recovers():
    testing = pytest.importorskip("ctxcache_client.testing")
    pg, redis = PrivatePostgres(), PrivateRedis()
    pg.start()
    redis.start()
    env = {"CTXCACHE_DATABASE_URL": pg.url, "CTXCACHE_REDIS_URL": redis.url,
           "CTXCACHE_KV_DISK_BYTES": "0"}
    try:
        with testing.live_gateway(env) as url:
            q = "What is the capital of Italy?"
            chat(url, q)
            assert chat(url, q).headers["x-ctxcache-cache"] == "semantic-hit"
            did = httpx.post(url + "/v1/documents", json={"documents": [{
                "text": "Mount Kilimanjaro in Tanzania is the highest mountain in Africa."}]},
                timeout=300).json()["data"][0]["id"]

            redis.stop()
            pg.stop()
            statuses = []
            for country in ("France", "Spain", "Japan", "Egypt"):  # answers keep flowing
                r = chat(url, f"What is the capital of {country}? Answer in one word.")
                statuses.append(r.status_code)
                assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
                # the in-memory index still answers "miss"; storing the answer is skipped
                assert r.headers["x-ctxcache-cache"] in ("miss", "off")
            rag = httpx.post(url + "/v1/rag", json={
                "question": "Where is the highest mountain in Africa?", "max_tokens": 12,
                "passages": ["Mount Kilimanjaro is in Tanzania.", "Redis is down right now."],
                "cache": False}, timeout=300)
            statuses.append(rag.status_code)
            assert rag.status_code == 200  # new chunk K/V: the Redis tier is skipped
            docs = httpx.get(url + f"/v1/documents/{did}", timeout=60)
            assert docs.status_code == 503 and docs.headers.get("retry-after")
            assert docs.json()["error"]["code"] == "database_unavailable"
            metrics = httpx.get(url + "/metrics").text
            assert 'ctxcache_semantic_errors_total{op="insert"}' in metrics

            pg.start()
            redis.start()
            t0 = time.monotonic()
            while chat(url, q).headers["x-ctxcache-cache"] != "semantic-hit":
                assert time.monotonic() - t0 < 60, "semantic cache did not come back"
                time.sleep(0.5)
            recovered = time.monotonic() - t0
            assert httpx.get(url + f"/v1/documents/{did}").status_code == 200
            time.sleep(5.5)  # the Redis tier is retried after its back-off
            httpx.post(url + "/v1/rag", json={"question": "Which mountain?", "max_tokens": 4,
                                              "passages": ["A new passage after recovery."],
                                              "cache": False}, timeout=300)
            tiers = httpx.get(url + "/v1/cache/stats").json()["kv"]["tiers"]
            assert [t["healthy"] for t in tiers if t["name"] == "redis"] == [True]
            print(f"outage: {len(statuses)} requests, all {set(statuses)}; semantic cache back "
                  f"{recovered:.1f}s after the database")
    finally:
        pg.stop()
        pg.remove()
        if redis.proc and redis.proc.poll() is None:
            redis.stop()
