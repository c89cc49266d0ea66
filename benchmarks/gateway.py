"""Gateway end to end over HTTP on 127.0.0.1 (real server, real model, CPU).

(a) semantic-cache hit latency over HTTP, p50 / p99 (identical and paraphrased questions);
(b) overhead the gateway adds to a miss: the same requests (1 generated token) through the
    gateway vs calling the embedded backend in-process; embedding time reported separately;
(c) throughput with 1 / 4 / 16 concurrent clients (hits), bounded and loopback only.

    python benchmarks/gateway.py
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import environment, print_table, write_json  # noqa: E402
from ctxcache.engine import SamplingParams  # noqa: E402
from ctxcache.service.app import Gateway, create_app  # noqa: E402
from ctxcache.service.backends import GenRequest  # noqa: E402
from ctxcache.service.settings import Settings  # noqa: E402

MODEL = "smollm2-135m-instruct"
QUESTIONS = [
    "What is the capital of France?", "Who wrote Pride and Prejudice?",
    "How do I reverse a list in Python?", "What is the boiling point of water?",
    "Which planet is known as the red planet?", "What is 12 times 12?",
    "How many continents are there?", "What does HTTP stand for?",
]
PARAPHRASES = [
    "What's the capital city of France?", "Who is the author of Pride and Prejudice?",
    "How can I reverse a Python list?", "At what temperature does water boil?",
    "Which planet is called the red planet?", "What is twelve times twelve?",
    "How many continents exist?", "What is HTTP short for?",
]


def pct(xs, q):
    return float(np.percentile(np.array(xs), q)) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import threading

    import uvicorn

    tmp = Path(tempfile.mkdtemp(prefix="ctxcache-gw-bench-"))
    settings = Settings(data_dir=tmp, database_url=f"sqlite:///{tmp}/gw.db", max_queue=64,
                        default_rate_limit_per_min=10**6)
    gw = Gateway(settings)
    server = uvicorn.Server(uvicorn.Config(create_app(gateway=gw), host="127.0.0.1", port=0,
                                           log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    client = httpx.Client(timeout=120)

    def ask(q, max_tokens=48, cache=True):
        r = client.post(url, json={"model": MODEL, "max_tokens": max_tokens, "cache": cache,
                                   "messages": [{"role": "user", "content": q}]})
        r.raise_for_status()
        return r

    # fill the cache; only complete answers are stored, so keep the questions that were
    cached = []
    for q, p in zip(QUESTIONS, PARAPHRASES):
        ask(q, max_tokens=128)
        if ask(q, max_tokens=128).headers["x-ctxcache-cache"] == "semantic-hit":
            cached.append((q, p))
    print(f"{len(cached)} of {len(QUESTIONS)} questions cached", flush=True)
    # (a) hit latency
    hit_exact, hit_para, kinds = [], [], []
    for i in range(args.requests):
        q, p = cached[i % len(cached)]
        t0 = time.perf_counter()
        r = ask(q, max_tokens=128)
        hit_exact.append(time.perf_counter() - t0)
        kinds.append(r.headers["x-ctxcache-cache"])
        t0 = time.perf_counter()
        r = ask(p, max_tokens=128)
        if r.headers["x-ctxcache-cache"] == "semantic-hit":
            hit_para.append(time.perf_counter() - t0)
    # embedding alone (inside the hit path)
    emb = gw.semantic.embedder
    et = []
    for q in QUESTIONS * 5:
        t0 = time.perf_counter()
        emb.embed([q])
        et.append(time.perf_counter() - t0)
    # (b) miss overhead: unique prompts, 1 token, gateway vs in-process backend
    miss_gw, direct = [], []
    for i in range(20):
        q = f"Request number {i}: name a color."
        t0 = time.perf_counter()
        ask(q, max_tokens=1)
        miss_gw.append(time.perf_counter() - t0)
        req = GenRequest(SamplingParams(max_tokens=1), messages=[{"role": "user",
                                                                  "content": q + " (direct)"}])
        t0 = time.perf_counter()
        "".join(c.text for c in gw.backend.generate(req).chunks)
        direct.append(time.perf_counter() - t0)
    # (c) concurrency on hits
    conc = []
    for n in (1, 4, 16):
        total = 160
        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(n) as ex:
            codes = list(ex.map(lambda i: httpx.post(url, timeout=60, json={
                "model": MODEL, "max_tokens": 128,
                "messages": [{"role": "user", "content": cached[i % len(cached)][0]}]}
            ).status_code, range(total)))
        dt = time.perf_counter() - t0
        conc.append({"clients": n, "requests": total, "req_per_s": total / dt,
                     "ok": codes.count(200), "429": codes.count(429)})
    server.should_exit = True
    th.join(timeout=10)
    gw.close()

    res = {
        "hit_exact_p50_ms": pct(hit_exact, 50), "hit_exact_p99_ms": pct(hit_exact, 99),
        "hit_paraphrase_p50_ms": pct(hit_para, 50) if hit_para else None,
        "hit_paraphrase_p99_ms": pct(hit_para, 99) if hit_para else None,
        "paraphrase_hit_rate": len(hit_para) / args.requests,
        "questions_cached": f"{len(cached)}/{len(QUESTIONS)}",
        "exact_hit_rate": kinds.count("semantic-hit") / len(kinds),
        "embedding_p50_ms": pct(et, 50),
        "miss_gateway_p50_ms": pct(miss_gw, 50), "miss_direct_p50_ms": pct(direct, 50),
        "miss_overhead_p50_ms": pct(miss_gw, 50) - pct(direct, 50),
        "miss_overhead_minus_embedding_ms": pct(miss_gw, 50) - pct(direct, 50) - pct(et, 50),
        "concurrency": conc,
    }
    print_table("gateway over HTTP (loopback, CPU)", ["metric", "value"],
                [[k, v] for k, v in res.items() if k != "concurrency"])
    print_table("hits under concurrent clients", ["clients", "requests", "req/s", "200", "429"],
                [[c["clients"], c["requests"], c["req_per_s"], c["ok"], c["429"]] for c in conc])
    write_json("gateway", {"benchmark": "gateway", "env": environment("cpu"), **res,
                           "median_direct_s": statistics.median(direct)}, args.out)


if __name__ == "__main__":
    main()
