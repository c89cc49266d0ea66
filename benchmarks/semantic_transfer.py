"""Do per-category thresholds beat one global threshold on traffic they were not tuned on?

Leave-one-source-out over the six independent sources of the multi-domain set
(``benchmarks/semantic_pairs.py``: templated code, templated math, SQuAD, VitaminC,
Topical-Chat, fow-cache). For each held-out source S and each of ``--resplits`` re-splits:

* calibrate on a random half of the pairs of the *other* sources: per-category thresholds
  (the Lagrangian allocation of ``semantic_multidomain.Simulator.calibrate``) and one global
  threshold, both for false hits ≤ ``--target``;
* evaluate both on S, which the calibration never saw: hit rate (right hits / queries whose
  answer is stored) and false-hit rate (false hits / queries); and the gain of per-category
  over the best global threshold *at the same false-hit rate on S* (an oracle for the global
  side, as the issue's held-out evaluation did).

Every decision is simulated exactly as the cache decides (nearest stored entries, the stricter
of the query's and the entry's category threshold), with and without the key guard
(``ctxcache/semantic/guard.py``), over all stored texts of all sources.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks.common import print_table, write_json  # noqa: E402
from benchmarks.semantic_multidomain import Simulator, Vectors, new_cache  # noqa: E402
from benchmarks.semantic_pairs import multidomain_pairs  # noqa: E402
from ctxcache.semantic import TransformerEmbedder  # noqa: E402
from ctxcache.semantic.guard import keys_agree  # noqa: E402


class GuardedSimulator(Simulator):
    """``Simulator`` whose candidates must also agree on hard keys with the query."""

    def __init__(self, *a, stored_texts, queries, guard: bool, **kw):
        super().__init__(*a, **kw)
        self.agree = np.ones_like(self.sims, dtype=bool)
        if guard:
            for i, q in enumerate(queries):
                for j, e in enumerate(self.top[i]):
                    self.agree[i, j] = keys_agree(q["b"], stored_texts[e])

    def outcome(self, thr, rows):
        thr = np.where(self.fixed, 2.0, thr)
        need = np.maximum(thr[self.qcat[rows]][:, None], thr[self.ecat[rows]])
        ok = (self.sims[rows] >= need) & self.agree[rows]
        any_ok = ok.any(1)
        first = ok.argmax(1)
        right = any_ok & self.right[rows, first]
        return right, any_ok & ~right


def rates(sim, thr, rows, should):
    r, f = sim.outcome(thr, rows)
    return float(r.sum() / max(should[rows].sum(), 1)), float(f.sum() / len(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--targets", default="0.01,0.05")
    ap.add_argument("--resplits", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    targets = [float(t) for t in args.targets.split(",")]
    real = TransformerEmbedder()
    pairs = multidomain_pairs(real.embed, args.seed)
    stored: dict[str, str] = {}
    for p in pairs:
        stored.setdefault(p["a"], p["ans_a"])
    answers = set(stored.values())
    should = np.array([p["ans_b"] in answers for p in pairs])
    emb = Vectors(real, sorted(set(stored) | {p["b"] for p in pairs}))
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        probe = new_cache(emb, tmp, "probe", {})
        cats = list(probe.categories)
        shipped = np.array([probe.policies[c].threshold for c in cats])
        stored_cats = [probe.router.categorize(emb.vec[t], None, None) for t in stored]
        q_cats = [probe.router.categorize(emb.vec[p["b"]], None, None) for p in pairs]
        probe.close()
    texts = list(stored)
    sims = {g: GuardedSimulator(emb, texts, list(stored.values()), stored_cats, pairs, q_cats,
                                cats, stored_texts=texts, queries=pairs, guard=g)
            for g in (False, True)}
    sources = sorted({p["source"] for p in pairs})
    by_src = defaultdict(list)
    for i, p in enumerate(pairs):
        by_src[p["source"]].append(i)
    rng = np.random.default_rng(args.seed)
    results: dict = {}
    rows_out = []
    for guard, sim in sims.items():
        for target in targets:
            key = f"guard={'on' if guard else 'off'} target={target:g}"
            per_src = {}
            for s in sources:
                ev = np.array(by_src[s])
                others = np.array([i for i in range(len(pairs)) if pairs[i]["source"] != s])
                recs = defaultdict(list)
                for _ in range(args.resplits):
                    cal = rng.choice(others, size=len(others) // 2, replace=False)
                    g = sim.best_global(cal, target)
                    pc = sim.calibrate(cal, target, g)
                    thr_pc = np.array([pc[c] for c in cats])
                    h_pc, f_pc = rates(sim, thr_pc, ev, should)
                    h_g, f_g = rates(sim, np.full(len(cats), g), ev, should)
                    g_same = sim.best_global(ev, f_pc)
                    h_same, f_same = rates(sim, np.full(len(cats), g_same), ev, should)
                    for k, v in (("per_category_hit", h_pc), ("per_category_fhr", f_pc),
                                 ("global_hit", h_g), ("global_fhr", f_g),
                                 ("global_same_fhr_hit", h_same),
                                 ("gain_at_same_fhr", h_pc - h_same)):
                        recs[k].append(v)
                h_sh, f_sh = rates(sim, shipped, ev, should)
                per_src[s] = {k: {"mean": float(np.mean(v)), "std": float(np.std(v)),
                                  "positive_share": float(np.mean(np.array(v) > 0))
                                  if k == "gain_at_same_fhr" else None}
                              for k, v in recs.items()}
                per_src[s]["shipped"] = {"hit": h_sh, "fhr": f_sh}
                per_src[s]["pairs"] = int(len(ev))
                m = per_src[s]
                rows_out.append([key, s, len(ev), m["per_category_hit"]["mean"],
                                 m["per_category_fhr"]["mean"], m["global_hit"]["mean"],
                                 m["global_fhr"]["mean"],
                                 f"{m['gain_at_same_fhr']['mean']:+.3f} ± "
                                 f"{m['gain_at_same_fhr']['std']:.3f}",
                                 m["gain_at_same_fhr"]["positive_share"], h_sh, f_sh])
            gains = [per_src[s]["gain_at_same_fhr"]["mean"] for s in sources]
            results[key] = {"per_source": per_src, "mean_gain_at_same_fhr": float(np.mean(gains)),
                            "sources_with_positive_gain": int(sum(x > 0 for x in gains))}
    print_table(f"leave-one-source-out, {args.resplits} re-splits each ({len(pairs)} pairs, "
                f"{len(stored)} stored)",
                ["setting", "held-out source", "pairs", "per-cat hit", "per-cat FHR",
                 "global hit", "global FHR", "gain at same FHR (mean ± sd)", "splits > 0",
                 "shipped hit", "shipped FHR"], rows_out)
    for k, v in results.items():
        print(f"  {k}: mean gain {v['mean_gain_at_same_fhr']:+.3f}, positive on "
              f"{v['sources_with_positive_gain']}/{len(sources)} sources")
    write_json("semantic_transfer", {"benchmark": "semantic_transfer", "sources": sources,
                                     "resplits": args.resplits, "targets": targets,
                                     "shipped_thresholds": dict(zip(cats, shipped.tolist())),
                                     "results": results}, args.out)


if __name__ == "__main__":
    main()
