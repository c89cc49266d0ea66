"""Semantic index at 1M entries of real sentence embeddings: recall and lookup latency.

Entries: 1M distinct real English sentences from the BIG-bench archive
(``ctxcache.datasets.bigbench_sentences``), embedded once with the default MiniLM and cached as
``.npy`` chunks under ``<cache dir>/data/vectors-<model>-<n>/`` (outside git; encoding 1M on a
2-core CPU takes over an hour, re-runs reuse the file). Queries: casual rewrites of stored
sentences (``semantic.rewrite``: the paraphrase kind a cache should hit), embedded the same way.

Reported per index size (10K, 100K, 1M, each a prefix of the same 1M) and HNSW setting (M, ef):
* ANN recall@1 — share of queries whose HNSW nearest entry is the exact (brute-force) nearest;
* paraphrase recall@1 — share whose nearest entry is the sentence it was rewritten from, for
  exact search and for HNSW (the embedder's limit vs what the index loses);
* lookup p50 / p99 through the whole ``SemanticCache.lookup`` (HNSW + SQL record fetch +
  policy; embedding excluded, reported separately), SQLite, one tenant and category.

    python benchmarks/semantic_scale.py --encode-only        # once, in the background
    python benchmarks/semantic_scale.py --sizes 10000,100000,1000000
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks.common import environment, print_table, write_json  # noqa: E402
from ctxcache.datasets import _data_dir, bigbench_sentences  # noqa: E402
from ctxcache.semantic import (  # noqa: E402
    CacheRequest, HnswParams, SemanticCache, TransformerEmbedder,
)
from ctxcache.semantic.index import auto_ef  # noqa: E402
from ctxcache.semantic.language import LanguageGate  # noqa: E402
from ctxcache.semantic.rewrite import casual  # noqa: E402

CHUNK = 20_000


def encoded(embedder, n: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """The n sentences and their vectors, encoded chunk by chunk (resumable) and cached."""
    sents = bigbench_sentences(n, seed)
    d = _data_dir() / f"vectors-{embedder.name}-{n}-{seed}"
    d.mkdir(parents=True, exist_ok=True)
    parts = []
    for k, i in enumerate(range(0, len(sents), CHUNK)):
        f = d / f"{k:05d}.npy"
        if not f.is_file():
            t0 = time.perf_counter()
            batch = sents[i:i + CHUNK]
            order = sorted(range(len(batch)), key=lambda j: len(batch[j]))  # less padding
            v = np.empty((len(batch), embedder.dim), np.float16)
            v[order] = embedder.embed([batch[j] for j in order]).astype(np.float16)
            np.save(d / f"{k:05d}.tmp.npy", v)
            os.replace(d / f"{k:05d}.tmp.npy", f)
            print(f"  encoded {i + len(batch)}/{len(sents)} "
                  f"({len(batch) / (time.perf_counter() - t0):.0f}/s)", flush=True)
        parts.append(np.load(f))
    vecs = np.concatenate(parts).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)  # fp16 storage: renormalise
    return sents, vecs


def exact_top1(base: np.ndarray, queries: np.ndarray, block: int = 200_000) -> np.ndarray:
    best = np.full(len(queries), -np.inf, np.float32)
    arg = np.zeros(len(queries), np.int64)
    for i in range(0, len(base), block):
        s = queries @ base[i:i + block].T
        j = s.argmax(1)
        v = s[np.arange(len(queries)), j]
        upd = v > best
        best[upd], arg[upd] = v[upd], j[upd] + i
    return arg


def measure(sents, vecs, n: int, q_idx, q_text, q_vec, m: int, efs: list[int | None],
            embedder) -> list[dict]:
    base = vecs[:n]
    exact = exact_top1(base, q_vec)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = SemanticCache(embedder, db_url=f"sqlite:///{tmp}/s.db", hnsw=HnswParams(M=m))
        cache.set_policy("factual", {"max_entries": n, "threshold": 0.5, "min_threshold": 0.5})
        t0 = time.perf_counter()
        cache.bulk_load("bench", "factual", sents[:n], base,
                        [{"i": i} for i in range(n)])
        build_s = time.perf_counter() - t0
        first_id = min(cache.indexes["bench"].ids)  # SQL ids follow insertion order
        reqs = [CacheRequest(t, tenant="bench", category="factual") for t in q_text]
        for ef in efs:
            cache.indexes["bench"].params = HnswParams(M=m, ef=ef)
            for req, v in list(zip(reqs, q_vec))[:50]:
                cache.lookup(req, embedding=v)  # warm-up
            idx = cache.indexes["bench"]
            lat, got, idx_lat, ann = [], [], [], []
            for req, v in zip(reqs, q_vec):
                r = cache.lookup(req, embedding=v)
                lat.append(r.latency_s)
                got.append(r.hit.response["i"] if r.hit else -1)
                t0 = time.perf_counter()
                ids, _ = idx.query(v, 1)
                idx_lat.append(time.perf_counter() - t0)
                ann.append(ids[0] - first_id)
            got, ann = np.array(got), np.array(ann)
            rows.append({"entries": n, "M": m, "ef": ef or f"auto ({auto_ef(n)})",
                         "build_s": build_s,
                         "ann_recall_at_1": float((ann == exact).mean()),
                         "paraphrase_recall_at_1_exact": float((exact == q_idx).mean()),
                         "paraphrase_recall_at_1_hnsw": float((ann == q_idx).mean()),
                         "lookup_served_own_entry": float((got == q_idx).mean()),
                         "p50_ms": float(np.percentile(lat, 50) * 1e3),
                         "p99_ms": float(np.percentile(lat, 99) * 1e3),
                         "index_p50_ms": float(np.percentile(idx_lat, 50) * 1e3),
                         "index_p99_ms": float(np.percentile(idx_lat, 99) * 1e3)})
            print(f"  n={n} M={m} ef={ef}: {rows[-1]}", flush=True)
        cache.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="sentences encoded")
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--m", default="16,32", help="HNSW M values")
    ap.add_argument("--ef", default="32,64,128,auto")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--encode-only", action="store_true")
    ap.add_argument("--device", default="cpu", help="where to encode (lookups stay on the CPU)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    embedder = TransformerEmbedder(batch_size=256 if args.device == "cpu" else 1024,
                                   max_length=128, device=args.device)
    sents, vecs = encoded(embedder, args.n)
    if args.encode_only:
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    rng = random.Random(1)
    rows = []
    gate = LanguageGate(embedder.languages)
    for n in sizes:
        # queries the cache would serve: rewrites of stored sentences in the embedder's language
        # (~11 % of the ASCII sentences are Dutch, Spanish, ...: the language gate keeps those
        # out of the cache, so they are stored here but not asked)
        pool = [i for i in rng.sample(range(n), min(n, 3 * args.queries))
                if gate.check(sents[i]).covered][:args.queries]
        q_idx = np.array(pool)
        q_text = [casual(sents[i], random.Random(int(i))) for i in q_idx]
        keep = [k for k, (i, t) in enumerate(zip(q_idx, q_text))
                if t != sents[i] and gate.check(t).covered]
        q_idx, q_text = q_idx[keep], [q_text[k] for k in keep]
        t0 = time.perf_counter()
        q_vec = embedder.embed(q_text)
        embed_ms = (time.perf_counter() - t0) / len(q_text) * 1e3
        for m in (int(x) for x in args.m.split(",")):
            efs = [None if x == "auto" else int(x) for x in args.ef.split(",")]
            for r in measure(sents, vecs, n, q_idx, q_text, q_vec, m, efs, embedder):
                rows.append({**r, "queries": len(q_idx), "embed_ms_per_query_batched": embed_ms})
    print_table(f"semantic index with real MiniLM vectors of real sentences "
                f"({rows[0]['queries'] if rows else 0} casual-rewrite queries; "
                "lookup = SemanticCache.lookup, embedding excluded; SQLite)",
                ["entries", "M", "ef", "ANN recall@1", "paraphrase@1 exact", "paraphrase@1 HNSW",
                 "lookup p50 ms", "lookup p99 ms", "index p50 ms", "index p99 ms", "build s"],
                [[r["entries"], r["M"], r["ef"], r["ann_recall_at_1"],
                  r["paraphrase_recall_at_1_exact"], r["paraphrase_recall_at_1_hnsw"],
                  r["p50_ms"], r["p99_ms"], r["index_p50_ms"], r["index_p99_ms"], r["build_s"]]
                 for r in rows])
    write_json("semantic_scale", {"benchmark": "semantic_scale", "encoded": args.n,
                                  "rows": rows, "env": environment("cpu")}, args.out)


if __name__ == "__main__":
    main()
