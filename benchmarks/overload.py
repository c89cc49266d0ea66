"""Overload: a real gateway (``ctxcache serve``) driven at 10× its sustainable request rate.

First the sustainable rate R is measured with ``max_concurrency`` (16) clients each sending
requests back to back (the batch the serving engine runs at once: its capacity). Then requests arrive open-loop
at ``--factor`` × R for ``--seconds``. Reported: admitted throughput (200s per second) against
R, how fast excess requests are refused (429) and with what, the slowest request (nothing may
hang), and the gateway's resident memory before, at peak and after.

    python benchmarks/overload.py                 # writes benchmarks/results/reliability.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import httpx  # noqa: E402

from benchmarks.common import print_table, write_json  # noqa: E402


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def one(client: httpx.Client, i: int, max_tokens: int) -> tuple[int, float]:
    t0 = time.perf_counter()
    try:
        r = client.post("/v1/chat/completions", json={
            "model": "default", "max_tokens": max_tokens, "cache": False,
            "messages": [{"role": "user", "content": f"Count to three, request {i}."}]})
        status = r.status_code
    except httpx.HTTPError:
        status = -1  # no answer within the client timeout: a hang
    return status, time.perf_counter() - t0


def measure(url: str, pid: int, unloaded_s: float = 8.0, overload_s: float = 15.0,
            factor: float = 10.0, max_tokens: int = 8, timeout_s: float = 60.0,
            parallel: int = 16) -> dict:
    """``parallel`` closed-loop clients measure the sustainable rate: with continuous
    batching the gateway serves ``max_concurrency`` requests at once, so one client back to
    back would understate its capacity (and "10×" of that would not overload it)."""
    client = httpx.Client(base_url=url, timeout=timeout_s,
                          limits=httpx.Limits(max_connections=1024))
    one(client, -1, max_tokens)  # warm-up
    t0 = time.perf_counter()
    counts = [0] * parallel

    def loop(k: int) -> None:
        while time.perf_counter() - t0 < unloaded_s:
            status, _ = one(client, k * 1000 + counts[k], max_tokens)
            assert status == 200, status
            counts[k] += 1

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        list(pool.map(loop, range(parallel)))
    rate = sum(counts) / (time.perf_counter() - t0)
    rss_before = rss_mb(pid)
    peak = [rss_before]
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.1):
            peak.append(rss_mb(pid))

    w = threading.Thread(target=watch)
    w.start()
    results: list[tuple[int, float]] = []
    interval = 1.0 / (factor * rate)
    with ThreadPoolExecutor(max_workers=512) as pool:
        futures, start, i = [], time.perf_counter(), 0
        while time.perf_counter() - start < overload_s:
            futures.append(pool.submit(one, client, 10_000 + i, max_tokens))
            i += 1
            time.sleep(max(0.0, start + i * interval - time.perf_counter()))
        sent_for = time.perf_counter() - start
        results = [f.result() for f in futures]
        drained = time.perf_counter() - start
    stop.set()
    w.join()
    rss_after = rss_mb(pid)
    ok = [d for s, d in results if s == 200]
    refused = [d for s, d in results if s in (429, 503)]
    other = [s for s, _ in results if s not in (200, 429, 503)]
    q = statistics.quantiles(refused, n=100) if len(refused) >= 2 else [float("nan")] * 99
    return {
        "sustainable_req_per_s": rate, "offered_req_per_s": len(results) / sent_for,
        "factor": factor, "requests": len(results), "ok": len(ok), "refused": len(refused),
        "other_status": sorted(set(other)), "hung": other.count(-1),
        "admitted_req_per_s": len(ok) / drained,
        "admitted_over_sustainable": (len(ok) / drained) / rate,
        "refusal_p50_ms": q[49] * 1e3, "refusal_p99_ms": q[98] * 1e3,
        "slowest_s": max(d for _, d in results),
        "rss_mb_before": rss_before, "rss_mb_peak": max(peak), "rss_mb_after": rss_after,
    }


def burst(url: str, pid: int, n: int, max_tokens: int = 8, timeout_s: float = 120.0) -> dict:
    """``n`` chats sent at the same instant (one asyncio client, ``n`` connections): how
    fast the excess is refused, whether anything hangs, memory, and that the gateway serves
    normally right after."""
    import asyncio

    import json

    host, port = url.split("//", 1)[1].rsplit(":", 1)

    async def run() -> list[tuple[int, float]]:
        # raw HTTP/1.1 over asyncio sockets: a client this thin (no httpx) costs microseconds
        # per request, so on a 2-core machine the figures are the server's, not the client's
        async def one_async(i: int) -> tuple[int, float]:
            body = json.dumps({"model": "default", "max_tokens": max_tokens, "cache": False,
                               "messages": [{"role": "user",
                                             "content": f"Count to three, {i}."}]}).encode()
            head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                    "Connection: close\r\n\r\n").encode()
            t0 = time.perf_counter()
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(host, int(port)), timeout_s)
                writer.write(head + body)
                await writer.drain()
                line = await asyncio.wait_for(reader.readline(), timeout_s)
                dt = time.perf_counter() - t0
                writer.close()
                return int(line.split()[1]), dt
            except (OSError, asyncio.TimeoutError, IndexError, ValueError):
                return -1, time.perf_counter() - t0
        return await asyncio.gather(*(one_async(i) for i in range(n)))

    rss_before = rss_mb(pid)
    t0 = time.perf_counter()
    results = asyncio.run(run())
    wall = time.perf_counter() - t0
    rss_after = rss_mb(pid)
    refused = [d for s, d in results if s == 429]
    q = statistics.quantiles(refused, n=100) if len(refused) >= 2 else [float("nan")] * 99
    with httpx.Client(base_url=url, timeout=timeout_s) as c:
        after, _ = one(c, -2, max_tokens)
    return {"burst": n, "ok": sum(s == 200 for s, _ in results), "refused_429": len(refused),
            "other_status": sorted({s for s, _ in results if s not in (200, 429)}),
            "hung": sum(s == -1 for s, _ in results),
            "refusal_p50_ms": q[49] * 1e3, "refusal_p99_ms": q[98] * 1e3,
            "refusal_max_ms": max(refused) * 1e3 if refused else None,
            "wall_s": wall, "status_after": after,
            "rss_mb_before": rss_before, "rss_mb_after": rss_after}


def bad_requests(url: str, pid: int, n: int = 1000) -> dict:
    """Resident memory before and after ``n`` malformed requests of the reported kinds."""
    bodies = [
        {"model": "default", "messages": [{"role": "user", "content": [{"type": "text",
                                                                        "text": None}]}]},
        {"model": "default", "messages": [{"role": "user", "content": "x"}],
         "temperature": 5e-324, "max_tokens": 10**9},
        {"model": "default", "messages": [{"role": "user", "content": "hi"}] * 20_000},
        {"model": "default", "messages": [{"role": "user", "content": "a\u0000b"}]},
    ]
    latencies = []
    with httpx.Client(base_url=url, timeout=60) as c:
        c.get("/v1/models")
        before = rss_mb(pid)
        codes = set()
        for i in range(n):
            t0 = time.perf_counter()
            r = c.post("/v1/chat/completions", json=bodies[i % len(bodies)])
            latencies.append(time.perf_counter() - t0)
            codes.add(r.status_code)
        after = rss_mb(pid)
    q = statistics.quantiles(latencies, n=100)
    return {"requests": n, "statuses": sorted(codes), "rss_mb_before": before,
            "rss_mb_after": after, "rss_growth": after / before - 1.0,
            "refusal_p50_ms": q[49] * 1e3, "refusal_p99_ms": q[98] * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--factor", type=float, default=10.0)
    ap.add_argument("--bursts", default="200,1000", help="simultaneous-burst sizes")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from ctxcache_client.testing import live_gateway

    with live_gateway() as url:
        pid = _server_pid(url)
        res = measure(url, pid, overload_s=args.seconds, factor=args.factor) \
            if args.seconds > 0 else {}
        bursts = [burst(url, pid, int(b)) for b in args.bursts.split(",") if b]
        bad = bad_requests(url, pid)
    print_table("overload: open-loop arrivals at "
                f"{args.factor:g}× the sustainable rate for {args.seconds:g}s",
                ["metric", "value"], [[k, v] for k, v in res.items()])
    keys = [k for k in bursts[0] if k != "burst"] if bursts else []
    print_table("simultaneous bursts", ["metric"] + [f"burst {b['burst']}" for b in bursts],
                [[k] + [b[k] for b in bursts] for k in keys])
    print_table("1,000 malformed requests", ["metric", "value"], [[k, v] for k, v in bad.items()])
    if not res:  # bursts only: keep the open-loop figures of the last full run
        import json
        from pathlib import Path

        prev = Path(args.out or Path(__file__).parent / "results") / "reliability.json"
        res = json.loads(prev.read_text()).get("overload", {}) if prev.is_file() else {}
    write_json("reliability", {"benchmark": "reliability", "overload": res, "bursts": bursts,
                               "bad_requests": bad}, args.out)


def _server_pid(url: str) -> int:
    """The gateway process listening on ``url``'s port (via /proc, Linux)."""
    port = int(url.rsplit(":", 1)[1])
    inode = None
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            parts = line.split()
            if int(parts[1].split(":")[1], 16) == port and parts[3] == "0A":
                inode = parts[9]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return int(pid)
        except OSError:
            continue
    raise RuntimeError("gateway process not found")


if __name__ == "__main__":
    main()
