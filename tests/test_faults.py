"""Fault injection: ``kill -9`` of a real gateway process in the middle of document ingestion
(SQL commits and chunk K/V writes to the disk tier in flight), then a restart on the same
state. Every acknowledged document must still be there and answerable, and every K/V record
left on disk must either load intact or be detected as corrupt — never served half-written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from test_service import free_port

from ctxcache.kv import DiskTier
from ctxcache.kv.serialize import CorruptEntryError


def _start(data, port) -> subprocess.Popen:
    env = {**os.environ, "CTXCACHE_DATA_DIR": str(data), "CTXCACHE_COST_MODEL": "off",
           "CTXCACHE_DATABASE_URL": f"sqlite:///{data}/gateway.db"}
    env.pop("CTXCACHE_REDIS_URL", None)  # local state only: what survives is on this disk
    proc = subprocess.Popen([sys.executable, "-m", "ctxcache.cli", "serve", "--port", str(port),
                             "--log-level", "warning"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    while True:
        assert proc.poll() is None, "gateway exited"
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        assert time.monotonic() - t0 < 300, "gateway not ready"
        time.sleep(0.2)


def doc(i: int) -> str:
    para = (f"Record {i}: the warehouse in district {i} stores {i * 7} crates of tea. "
            "Each crate is checked twice a day by the night shift. ")
    return "\n\n".join(para * 3 for _ in range(4))  # several chunks per document


@pytest.mark.slow
def test_kill_9_during_ingest_loses_no_acknowledged_document(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start(tmp_path, port)
    acked: list[tuple[int, str]] = []
    stop = threading.Event()

    def ingest() -> None:
        i = 0
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                try:
                    r = c.post(url + "/v1/documents", json={"documents": [{"text": doc(i)}]})
                except httpx.HTTPError:
                    return  # the server died mid-request: not acknowledged
                if r.status_code == 200:
                    acked.append((i, r.json()["data"][0]["id"]))
                i += 1

    t = threading.Thread(target=ingest)
    t.start()
    while len(acked) < 4:
        time.sleep(0.05)
    time.sleep(0.15)  # a request (SQL + chunk K/V writes) is in flight now
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    stop.set()
    t.join()
    killed_after = len(acked)

    # every record on disk: intact or detected corrupt (torn files are temp files, removed)
    tier = DiskTier(tmp_path / "kv", 1 << 40)
    intact = corrupt = 0
    for skey, _ in list(tier.scan()):
        try:
            entry = tier.get(skey)
            assert entry is not None and entry.tensors
            intact += 1
        except CorruptEntryError:
            corrupt += 1
    assert corrupt == 0, "an atomic rename never leaves a torn record"

    proc = _start(tmp_path, port)
    try:
        for i, did in acked:
            got = httpx.get(url + f"/v1/documents/{did}")
            assert got.status_code == 200, f"acknowledged document {i} lost"
        i, did = acked[-1]
        ans = httpx.post(url + "/v1/rag", json={
            "question": f"How many crates of tea does the warehouse in district {i} store?",
            "document_ids": [did], "max_tokens": 12, "cache": False}, timeout=300).json()
        assert ans["ctxcache"]["reused_tokens"] > 0 and ans["answer"]
        stats = httpx.get(url + "/v1/cache/stats").json()["kv"]
        assert stats["corrupt"] == 0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"kill -9 after {killed_after} acknowledged documents: 0 lost, {intact} K/V records "
          f"intact on disk, {corrupt} corrupt")
