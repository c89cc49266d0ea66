"""Category-aware (and verified) thresholds vs one global threshold vs GPTCache, multi-domain.

Set: ``benchmarks/semantic_pairs.py`` (code, math, factual, conversation, support; paraphrases
that should hit, near-misses that must not). All stored texts go into one SemanticCache
(real MiniLM vectors, hnswlib, SQLite; categories from the shipped classifier), every query is
looked up once. A hit is right when the served entry's answer key is the query's; any other
hit is a false hit. Hit rate = right hits / queries whose answer is stored; false-hit rate =
false hits / all queries.

Policies, 2-fold (calibrate on one half of the queries, evaluate on the other, swap, average):
* global — one threshold for everything (GPTCache / RedisVL style), the best one on the
  evaluation half at the same false-hit rate as the category-aware cache (an oracle: generous
  to the baseline), and the one calibrated on the calibration half for false hits <= target;
* category-aware — per-category thresholds calibrated on the calibration half (Lagrangian
  allocation of the false-hit budget over categories, simulated exactly as the cache decides:
  a candidate must pass its own and the query's category threshold) and then run through the
  real cache;
* category-aware + verified — the cache learns thresholds online while serving the evaluation
  half twice in random order (``max_error_rate`` per category: 5, 10, 20 % of hits may be
  wrong; 10 % of hits verified; candidates explored below the learned threshold and, until the
  bound holds, instead of serving); no calibration data; reported over both passes and over
  the second;
* GPTCache 0.1.44 default (similarity threshold 0.8, ``SearchDistanceEvaluation``), same
  vectors (``semantic_gptcache.run_gptcache``).

    python benchmarks/semantic_multidomain.py
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks.common import environment, print_table, write_json  # noqa: E402
from benchmarks.semantic_pairs import make_up, multidomain_pairs  # noqa: E402
from ctxcache.semantic import CacheRequest, SemanticCache, TransformerEmbedder  # noqa: E402
from ctxcache.semantic.verified import VerifiedThresholds, wilson_upper  # noqa: E402

GRID = np.round(np.arange(0.50, 1.0001, 0.005), 4)
TOPK = 8


class ExactJudge:
    """The benchmark's backend answers with the answer key: equal keys = a right answer."""

    def same(self, fresh: dict, stored: dict) -> bool:
        return fresh.get("text") == stored.get("text")


class Vectors:
    """MiniLM vectors computed once for all texts (both caches get the same ones)."""

    languages = ("en",)

    def __init__(self, real, texts):
        self.real, self.dim, self.name = real, real.dim, real.name
        self.vec = dict(zip(texts, real.embed(texts)))

    def embed(self, texts):
        missing = [t for t in texts if t not in self.vec]
        if missing:
            self.vec.update(zip(missing, self.real.embed(missing)))
        return np.stack([self.vec[t] for t in texts])


def new_cache(emb, tmp, name, stored, policies=None, **kw) -> SemanticCache:
    c = SemanticCache(emb, db_url=f"sqlite:///{tmp}/{name}.db", seed=0, **kw)
    for cat, values in (policies or {}).items():
        c.set_policy(cat, values)
    for text, ans in stored.items():
        c.insert(CacheRequest(text), {"text": ans}, embedding=emb.vec[text])
    return c


def score(served: list[str | None], queries: list[dict], answers: set[str]) -> dict:
    should = [q["ans_b"] in answers for q in queries]
    right = sum(s is not None and s == q["ans_b"] for s, q in zip(served, queries))
    false = sum(s is not None and s != q["ans_b"] for s, q in zip(served, queries))
    hits = right + false
    return {"hit_rate": right / max(sum(should), 1), "false_hit_rate": false / len(queries),
            "hits": hits, "false_hits": false, "queries": len(queries),
            "error_among_hits": false / hits if hits else 0.0,
            "error_among_hits_upper_95": wilson_upper(false, hits) if hits else None}


def run_static(emb, tmp, stored, queries, thresholds: dict[str, float], name) -> list:
    """The answer key each query is served (None: miss) under fixed per-category thresholds."""
    pol = {c: {"threshold": t, "min_threshold": t} for c, t in thresholds.items()}
    c = new_cache(emb, tmp, name, stored, pol)
    served = []
    for q in queries:
        r = c.lookup(CacheRequest(q["b"]), embedding=emb.vec[q["b"]])
        served.append(r.hit.response["text"] if r.hit else None)
    c.close()
    return served


class Simulator:
    """The cache's decision for any threshold vector, vectorised: the first of the query's
    nearest stored entries with similarity >= max(query category's, entry category's)."""

    def __init__(self, emb, stored_texts, stored_ans, stored_cats, queries, q_cats, cats,
                 uncacheable=("creative",)):
        a = np.stack([emb.vec[t] for t in stored_texts])
        b = np.stack([emb.vec[q["b"]] for q in queries])
        sims = b @ a.T
        self.top = np.argsort(-sims, axis=1)[:, :TOPK]
        self.sims = np.take_along_axis(sims, self.top, 1)
        ci = {c: i for i, c in enumerate(cats)}
        self.ecat = np.array([ci[c] for c in stored_cats])[self.top]
        self.qcat = np.array([ci[c] for c in q_cats])
        ans = np.array(stored_ans, dtype=object)[self.top]
        self.right = ans == np.array([q["ans_b"] for q in queries], dtype=object)[:, None]
        self.cats = cats
        self.fixed = np.array([c in uncacheable for c in cats])  # never served

    def outcome(self, thr: np.ndarray, rows: np.ndarray):
        thr = np.where(self.fixed, 2.0, thr)
        need = np.maximum(thr[self.qcat[rows]][:, None], thr[self.ecat[rows]])
        ok = self.sims[rows] >= need
        any_ok = ok.any(1)
        first = ok.argmax(1)
        right = any_ok & self.right[rows, first]
        return right, any_ok & ~right

    def calibrate(self, rows, target_fhr, start: float) -> dict[str, float]:
        """Per-category thresholds: maximise right hits − λ·false hits by coordinate descent,
        the smallest λ whose false-hit rate on ``rows`` is within the target."""
        n = len(rows)
        best = None
        for lam in [0, 0.5, 1, 2, 3, 5, 8, 12, 20, 35, 60, 100, 200]:
            thr = np.full(len(self.cats), start)
            for _ in range(3):
                for k in np.flatnonzero(~self.fixed):
                    vals = []
                    for t in GRID:
                        thr[k] = t
                        r, f = self.outcome(thr, rows)
                        vals.append(r.sum() - lam * f.sum())
                    thr[k] = GRID[int(np.argmax(vals))]
            r, f = self.outcome(thr, rows)
            if f.sum() / n <= target_fhr:
                best = thr.copy()
                break
        if best is None:
            best = np.full(len(self.cats), 1.0)
        return {c: float(t) for c, t in zip(self.cats, best)}

    def best_global(self, rows, max_fhr) -> float:
        best_t, best_r = 1.0, -1
        for t in GRID:
            r, f = self.outcome(np.full(len(self.cats), t), rows)
            if f.sum() / len(rows) <= max_fhr + 1e-12 and r.sum() > best_r:
                best_t, best_r = float(t), r.sum()
        return best_t


def run_verified(emb, tmp, stored, queries, bound, verify_rate, passes, seed, start=None):
    verifier = VerifiedThresholds()
    pol = {c: {"max_error_rate": bound} for c in
           ("code", "factual", "math", "conversation", "other")}
    for c, t in (start or {}).items():
        if c in pol:
            pol[c].update(threshold=t, min_threshold=t)
    cache = new_cache(emb, tmp, f"verified{seed}", stored, pol, verifier=verifier,
                      judge=ExactJudge(), verify_rate=verify_rate)
    rng = random.Random(seed)
    per_pass, extra = [], 0
    for _ in range(passes):
        order = list(range(len(queries)))
        rng.shuffle(order)
        served = [None] * len(queries)
        for i in order:
            q = queries[i]
            r = cache.lookup(CacheRequest(q["b"]), embedding=emb.vec[q["b"]])
            if r.hit is not None:
                served[i] = r.hit.response["text"]
                if cache.should_verify():
                    extra += 1
                    cache.record_outcome(r, {"text": q["ans_b"]})
            elif r.candidate is not None:  # the backend answered: compare for free
                cache.record_outcome(r, {"text": q["ans_b"]})
        per_pass.append(served)
    learned = {c: (t if t <= 1.0 else None) for c in pol
               for t in [cache.threshold_for("default", c)[0]]}
    cache.close()
    return per_pass, learned, extra


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target-fhr", type=float, default=0.05)
    ap.add_argument("--max-error", type=lambda v: [float(x) for x in v.split(",")],
                    default=[0.05, 0.1, 0.2],
                    help="verified: bounds on the share of hits that are wrong (comma list)")
    ap.add_argument("--verify-rate", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-gptcache", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    real = TransformerEmbedder()
    pairs = multidomain_pairs(real.embed, args.seed)
    stored = {}
    for p in pairs:
        stored.setdefault(p["a"], p["ans_a"])
    answers = set(stored.values())
    emb = Vectors(real, sorted(set(stored) | {p["b"] for p in pairs}))
    rng = np.random.default_rng(args.seed)
    by_dom = defaultdict(list)
    for i, p in enumerate(pairs):
        by_dom[p["domain"]].append(i)
    halves = [[], []]
    for idx in by_dom.values():
        idx = list(rng.permutation(idx))
        halves[0] += idx[: len(idx) // 2]
        halves[1] += idx[len(idx) // 2:]
    with tempfile.TemporaryDirectory() as tmp:
        probe = new_cache(emb, tmp, "probe", {})
        cats = list(probe.categories)
        shipped = {c: probe.policies[c].threshold for c in cats}
        stored_cats = [probe.router.categorize(emb.vec[t], None, None) for t in stored]
        q_cats = [probe.router.categorize(emb.vec[p["b"]], None, None) for p in pairs]
        probe.close()
        sim = Simulator(emb, list(stored), list(stored.values()), stored_cats, pairs, q_cats,
                        cats)
        folds = []
        for k in range(2):
            cal, ev = np.array(halves[k]), np.array(halves[1 - k])
            evq = [pairs[i] for i in ev]
            g_cal = sim.best_global(cal, args.target_fhr)
            per_cat = sim.calibrate(cal, args.target_fhr, g_cal)
            served_ca = run_static(emb, tmp, stored, evq, per_cat, f"ca{k}")
            ca = score(served_ca, evq, answers)
            g_same = sim.best_global(ev, ca["false_hit_rate"])
            served_g = run_static(emb, tmp, stored, evq, {c: g_same for c in cats}, f"g{k}")
            glob = score(served_g, evq, answers)
            gcal = score(run_static(emb, tmp, stored, evq, {c: g_cal for c in cats}, f"gc{k}"),
                         evq, answers)
            shipped_res = score(run_static(emb, tmp, stored, evq, shipped, f"s{k}"), evq,
                                answers)
            verified = {}
            for d in args.max_error:
                passes, learned, extra = run_verified(emb, tmp, stored, evq, d,
                                                      args.verify_rate, 2, args.seed + k)
                verified[f"verified_{d:g}_both_passes"] = {
                    **score(passes[0] + passes[1], evq + evq, answers), "learned": learned,
                    "verifications": extra}
                verified[f"verified_{d:g}_second_pass"] = score(passes[1], evq, answers)
            fold = {"category_aware": {**ca, "thresholds": per_cat},
                    "global_same_fhr": {**glob, "threshold": g_same},
                    "global_calibrated": {**gcal, "threshold": g_cal},
                    "shipped_thresholds": shipped_res, **verified,
                    "per_domain": per_domain(evq, {"category_aware": served_ca,
                                                   "global": served_g}, answers)}
            if not args.no_gptcache:
                from benchmarks.semantic_gptcache import gptcache_serve

                vec = {t: emb.vec[t].astype(np.float32) for t in emb.vec}
                got, _ = gptcache_serve(stored, [q["b"] for q in evq], vec, 0.8)
                fold["gptcache_default"] = score(got, evq, answers)
            folds.append(fold)
    keys = [k for k in folds[0] if k != "per_domain"]
    summary = {k: {m: float(np.mean([f[k][m] for f in folds]))
                   for m in ("hit_rate", "false_hit_rate", "error_among_hits")} for k in keys}
    names = {"category_aware": "category-aware (calibrated per category)",
             "global_same_fhr": "one global threshold, best at the same false hits (oracle)",
             "global_calibrated": f"one global threshold calibrated for <= {args.target_fhr:.0%}",
             "shipped_thresholds": "shipped per-category defaults (no calibration)",
             "gptcache_default": "GPTCache default (0.8)"}
    for d in args.max_error:
        names[f"verified_{d:g}_both_passes"] = f"verified, max {d:.0%} wrong hits (both passes)"
        names[f"verified_{d:g}_second_pass"] = f"verified, max {d:.0%} wrong hits (2nd pass)"
    print_table(f"multi-domain semantic cache — {len(pairs)} queries over {len(stored)} stored "
                f"({sum(p['ans_b'] in answers for p in pairs)} should hit), 2-fold",
                ["policy", "hit rate", "false-hit rate", "wrong among hits"],
                [[names[k], v["hit_rate"], v["false_hit_rate"], v["error_among_hits"]]
                 for k, v in summary.items()])
    for i, f in enumerate(folds):
        print(f"  fold {i}: per-category {f['category_aware']['thresholds']}; global "
              f"{f['global_same_fhr']['threshold']}; verified learned " + "; ".join(
                  f"{d:g}: {f[f'verified_{d:g}_both_passes']['learned']}"
                  for d in args.max_error))
    rows = []
    for d in sorted(folds[0]["per_domain"]):
        rows.append([d] + [float(np.mean([f["per_domain"][d][k][m] for f in folds]))
                           for k in ("category_aware", "global") for m in
                           ("hit_rate", "false_hit_rate")])
    print_table("per domain (evaluation halves)", ["domain", "cat-aware hit", "cat-aware FHR",
                                                   "global hit", "global FHR"], rows)
    write_json("semantic_multidomain", {
        "benchmark": "semantic_multidomain", "queries": len(pairs), "stored": len(stored),
        "make_up": make_up(pairs), "target_false_hit_rate": args.target_fhr,
        "max_error_rate": args.max_error, "verify_rate": args.verify_rate,
        "summary": summary, "folds": folds, "env": environment("cpu")}, args.out)


def per_domain(evq, runs: dict[str, list], answers) -> dict:
    """Hit and false-hit rates per domain of each run's served answers."""
    out = {}
    for d in sorted({q["domain"] for q in evq}):
        idx = [i for i, q in enumerate(evq) if q["domain"] == d]
        out[d] = {name: score([s[i] for i in idx], [evq[i] for i in idx], answers)
                  for name, s in runs.items()}
    return out


if __name__ == "__main__":
    main()
