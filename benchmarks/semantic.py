"""Semantic cache: lookup latency at scale, and category-aware vs global threshold on real pairs.

(a) Scale — synthetic normalised 384-d vectors (what MiniLM produces) bulk-loaded at 10K / 100K /
    1M entries into one (tenant, category) of a SQLite-backed cache; lookups of near-duplicates
    (hits) and of fresh vectors (misses), embedding excluded (reported separately: the real
    MiniLM on this CPU). The miss overhead is what the cache adds to a request it cannot serve.
(b) Quality — the 600 labelled pairs of ``fow-cache`` (paraphrases / near repeats that should
    hit; negations, entity swaps, number/date and scope changes that must not). Embedded with
    MiniLM, categorised by our classifier; thresholds per category are calibrated on one half
    (highest threshold-free hit rate with false hits ≤ target), the other half evaluates. The
    global threshold (GPTCache-style) is set to produce the *same* false-hit rate on the
    evaluation half, and hit rates are compared.

    python benchmarks/semantic.py --sizes 10000,100000,1000000
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks.common import environment, print_table, write_json  # noqa: E402
from ctxcache.datasets import fow_pairs  # noqa: E402
from ctxcache.semantic import CacheRequest, SemanticCache, TransformerEmbedder  # noqa: E402


class FixedEmbedder:
    """Stands in for the text encoder in the scale test, where vectors are given directly."""

    def __init__(self, real):
        self.dim, self.name, self.real = real.dim, real.name, real

    def embed(self, texts):
        return self.real.embed(texts)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def scale(sizes: list[int], embedder, queries: int) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            cache = SemanticCache(FixedEmbedder(embedder), db_url=f"sqlite:///{tmp}/s.db")
            cache.set_policy("code", {"max_entries": max(n, 1)})
            vecs = unit(rng.standard_normal((n, embedder.dim)))
            t0 = time.perf_counter()
            cache.bulk_load("bench", "code", [f"q{i}" for i in range(n)], vecs,
                            [{"text": f"a{i}"} for i in range(n)])
            ins = time.perf_counter() - t0
            pick = rng.integers(0, n, queries)
            near = unit(vecs[pick] + 0.02 * rng.standard_normal((queries, embedder.dim)))
            fresh = unit(rng.standard_normal((queries, embedder.dim)))
            req = CacheRequest("q", tenant="bench", category="code")
            for v in near[:20]:
                cache.lookup(req, embedding=v)  # warm-up
            hit_t, miss_t, hits = [], [], 0
            for v in near:
                r = cache.lookup(req, embedding=v)
                hit_t.append(r.latency_s)
                hits += r.hit is not None
            for v in fresh:
                r = cache.lookup(req, embedding=v)
                miss_t.append(r.latency_s)
            cache.close()
        rows.append({
            "entries": n, "insert_per_s": n / ins, "insert_s": ins,
            "hit_p50_ms": float(np.percentile(hit_t, 50) * 1e3),
            "hit_p99_ms": float(np.percentile(hit_t, 99) * 1e3),
            "miss_p50_ms": float(np.percentile(miss_t, 50) * 1e3),
            "miss_p99_ms": float(np.percentile(miss_t, 99) * 1e3),
            "near_duplicate_recall": hits / queries,
        })
        print(f"  {n} entries done", flush=True)
    return rows


def rates(sims: np.ndarray, pos: np.ndarray, thr) -> tuple[float, float]:
    hit = sims >= thr
    return float(hit[pos].mean()) if pos.any() else 0.0, \
        float(hit[~pos].mean()) if (~pos).any() else 0.0


def _allocate(sims, pos, cats, idx, grid, budget_fhr, min_pairs, global_thr):
    """Per-category thresholds maximising total hits with total false hits within budget.

    Lagrangian sweep: for a price λ on false hits each category takes the threshold maximising
    hits − λ·false hits; the smallest λ meeting the budget wins. Categories with fewer than
    ``min_pairs`` calibration pairs keep the global threshold (too little data to tune).
    """
    n_neg = max(int((~pos[idx]).sum()), 1)
    budget = budget_fhr * n_neg
    cands = {}
    for c in np.unique(cats):
        ci = idx[cats[idx] == c]
        if len(ci) < min_pairs:
            continue
        hits = np.array([(sims[ci][pos[ci]] >= t).sum() for t in grid])
        fhs = np.array([(sims[ci][~pos[ci]] >= t).sum() for t in grid])
        cands[str(c)] = (hits, fhs)
    fixed_fh = sum(int((sims[i] >= global_thr) & ~pos[i]) for i in idx if cats[i] not in cands)
    best = {c: 1.01 for c in cands}
    for lam in np.concatenate([np.linspace(0.0, 5.0, 101), [10, 20, 50, 100]]):
        choice = {c: int(np.argmax(h - lam * f)) for c, (h, f) in cands.items()}
        fh = fixed_fh + sum(cands[c][1][k] for c, k in choice.items())
        if fh <= budget:
            best = {c: float(grid[k]) for c, k in choice.items()}
            break
    return best


def quality(embedder, target_fhr: float, seed: int, min_pairs: int = 20) -> dict:
    pairs = fow_pairs()
    cache_cls = SemanticCache(embedder, db_url="sqlite://")
    a = embedder.embed([p["a"] for p in pairs])
    b = embedder.embed([p["b"] for p in pairs])
    sims = (a * b).sum(1)
    pos = np.array([bool(p["same_answer"]) for p in pairs])
    cats = np.array([str(c) for c in cache_cls.router.classifier.predict(a)])
    cache_cls.close()
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(pairs))
    halves = [perm[: len(perm) // 2], perm[len(perm) // 2:]]
    grid = np.round(np.arange(0.5, 1.0001, 0.005), 4)

    def global_threshold(idx, fhr):
        best = (1.01, 0.0)
        for t in grid:
            h, f = rates(sims[idx], pos[idx], t)
            if f <= fhr + 1e-9 and h > best[1]:
                best = (float(t), h)
        return best[0]

    folds = []
    for k in range(2):  # 2-fold: calibrate on one half, evaluate on the other, then swap
        cal, ev = halves[k], halves[1 - k]
        g_cal = global_threshold(cal, target_fhr)
        per_cat = _allocate(sims, pos, cats, cal, grid, target_fhr, min_pairs, g_cal)
        thr = np.array([per_cat.get(c, g_cal) for c in cats])
        ca_hit, ca_fhr = rates(sims[ev], pos[ev], thr[ev])
        g_same = global_threshold(ev, ca_fhr)  # global at the same false-hit rate
        g_hit, g_fhr = rates(sims[ev], pos[ev], g_same)
        gc_hit, gc_fhr = rates(sims[ev], pos[ev], g_cal)
        folds.append({"category_aware": {"hit_rate": ca_hit, "false_hit_rate": ca_fhr,
                                         "thresholds": per_cat, "default_threshold": g_cal},
                      "global_same_fhr": {"threshold": g_same, "hit_rate": g_hit,
                                          "false_hit_rate": g_fhr},
                      "global_calibrated": {"threshold": g_cal, "hit_rate": gc_hit,
                                            "false_hit_rate": gc_fhr}})

    def avg(key, metric):
        return float(np.mean([f[key][metric] for f in folds]))

    summary = {k: {"hit_rate": avg(k, "hit_rate"), "false_hit_rate": avg(k, "false_hit_rate")}
               for k in ("category_aware", "global_same_fhr", "global_calibrated")}
    counts = {str(c): int((cats == c).sum()) for c in np.unique(cats)}
    return {"pairs": len(pairs), "target_false_hit_rate": target_fhr, "min_pairs": min_pairs,
            "category_counts": counts, "summary": summary, "folds": folds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--target-fhr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    embedder = TransformerEmbedder()
    texts = ["How do I reverse a list in Python?"] * 1
    for _ in range(3):
        embedder.embed(texts)
    t = []
    for _ in range(50):
        t0 = time.perf_counter()
        embedder.embed(texts)
        t.append(time.perf_counter() - t0)
    embed_ms = float(np.median(t) * 1e3)
    q = quality(embedder, args.target_fhr, args.seed)
    sm = q["summary"]
    print_table(f"fow-cache pairs ({q['pairs']}; categories {q['category_counts']}): 2-fold, "
                f"calibrated for false hits <= {args.target_fhr:.0%}",
                ["policy", "hit rate", "false-hit rate"],
                [[name, sm[k]["hit_rate"], sm[k]["false_hit_rate"]] for name, k in (
                    ("category-aware", "category_aware"),
                    ("global @ same false-hit rate", "global_same_fhr"),
                    ("global calibrated alike", "global_calibrated"))])
    for i, f in enumerate(q["folds"]):
        print(f"  fold {i}: thresholds {f['category_aware']['thresholds']} "
              f"(others {f['category_aware']['default_threshold']}), "
              f"global@same-FHR {f['global_same_fhr']['threshold']}")
    rows = scale([int(s) for s in args.sizes.split(",")], embedder, args.queries)
    print_table(f"scale (lookup excludes embedding; MiniLM embedding on this CPU: "
                f"{embed_ms:.1f} ms/query)",
                ["entries", "insert/s", "hit p50 ms", "hit p99 ms", "miss p50 ms",
                 "miss p99 ms", "near-dup recall"],
                [[r["entries"], r["insert_per_s"], r["hit_p50_ms"], r["hit_p99_ms"],
                  r["miss_p50_ms"], r["miss_p99_ms"], r["near_duplicate_recall"]] for r in rows])
    write_json("semantic", {"benchmark": "semantic", "env": environment("cpu"),
                            "embed_ms_per_query": embed_ms, "scale": rows, "quality": q},
               args.out)


if __name__ == "__main__":
    main()
