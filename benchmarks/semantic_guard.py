"""Semantic-cache safety on pairs built for it: key swaps and long passage + question prompts.

A. **Key guard** (``ctxcache/semantic/guard.py``). Must-not-hit pairs whose only difference is a
   hard key: SQuAD dev questions with one number or one name swapped (for another number, or a
   name taken from another question), the multi-domain set's math pairs with one number changed,
   and fow-cache's labelled entity / number / date swaps. Should-hit pairs: every paraphrase of
   the multi-domain set (casual rewrites of SQuAD, VitaminC, Topical-Chat, code questions;
   fow-cache's human paraphrases). For each pair: would the cache serve ``a``'s answer for
   ``b`` (MiniLM cosine of the embedded parts ≥ the stricter shipped threshold of the two
   categories), without and with the guard.

B. **Long prompts** (``ctxcache/semantic/focus.py``). A SQuAD article's paragraphs joined to
   about N tokens (≈ 4 characters a token), then two different questions on that article:
   before, the whole prompt was embedded (the embedder reads its first 256 tokens); now the
   question is embedded and the passage must be identical. Reported: false hits (the other
   question served) and hits on a casual rewrite of the same question, per passage length.

The cache's decision is simulated for one stored entry per pair (the same rule ``lookup``
applies: similarity ≥ threshold, then the guard); the thresholds are the shipped policy's.
"""

from __future__ import annotations

import argparse
import random
import re
from collections import defaultdict

import numpy as np

from benchmarks.common import print_table, write_json
from benchmarks.semantic_pairs import multidomain_pairs
from ctxcache.datasets import squad_dev
from ctxcache.semantic import SemanticCache, TransformerEmbedder
from ctxcache.semantic.focus import focus, same_rest
from ctxcache.semantic.guard import hard_keys, keys_agree
from ctxcache.semantic.rewrite import casual

LENGTHS = [0, 60, 250, 500, 1000, 2000, 4000]


def swapped_questions(rng: random.Random, n: int) -> list[dict]:
    """SQuAD questions with one number or one name replaced."""
    qs = [q["question"] for art in squad_dev() for p in art["paragraphs"] for q in p["qas"]]
    rng.shuffle(qs)
    names = sorted({w for q in qs[:5000] for w in hard_keys(q).words if w.isalpha()})
    out = []
    for q in qs:
        if len(out) >= n:
            break
        nums = re.findall(r"(?<![\w.])\d{1,4}(?![\w.,])", q)
        if nums and rng.random() < 0.5:
            x = rng.choice(nums)
            y = str(int(x) + rng.choice([-3, -2, -1, 1, 2, 3, 10]))
            if y != x and not y.startswith("-"):
                out.append({"a": q, "b": re.sub(rf"(?<![\w.]){x}(?![\w.,])", y, q, count=1),
                            "kind": "number swap"})
                continue
        caps = [m.group(0) for m in re.finditer(r"(?<!^)(?<![.?!] )\b[A-Z][a-z]{2,}\b", q)
                if m.start() > 0 and m.group(0).lower() in names]
        if caps:
            x = rng.choice(caps)
            y = rng.choice(names).capitalize()
            if y.lower() != x.lower():
                out.append({"a": q, "b": q.replace(x, y, 1), "kind": "name swap"})
    return out


class Decider:
    def __init__(self, emb: TransformerEmbedder):
        self.emb = emb
        probe = SemanticCache(emb, db_url="sqlite://")  # its router and shipped policies
        self.pol, self.router = probe.policies, probe.router
        probe.close()

    def thresholds(self, vecs: np.ndarray) -> np.ndarray:
        out = []
        for v in vecs:
            c = self.router.categorize(v, None, None)
            p = self.pol[c]
            out.append(p.threshold if p.cacheable else 2.0)
        return np.array(out)

    def decide(self, a: list[str], b: list[str], embed_part) -> dict:
        va = self.emb.embed([embed_part(x) for x in a])
        vb = self.emb.embed([embed_part(x) for x in b])
        sims = (va * vb).sum(1)
        need = np.maximum(self.thresholds(va), self.thresholds(vb))
        return {"sims": sims, "above": sims >= need}


def part_a(emb, dec: Decider, seed: int, per_domain: int) -> dict:
    rng = random.Random(seed)
    pairs = multidomain_pairs(emb.embed, seed, per_domain)
    neg = [{"a": p["a"], "b": p["b"], "kind": f"{p['domain']}: {p['kind']}"} for p in pairs
           if not p["pos"] and (p["domain"] == "math" or p["domain"] == "support")]
    neg += swapped_questions(rng, 600)
    pos = [{"a": p["a"], "b": p["b"], "kind": f"{p['domain']}: {p['kind']}"}
           for p in pairs if p["pos"]]
    rows, out = [], {}
    for name, group in (("must not hit (key swaps)", neg), ("should hit (paraphrases)", pos)):
        d = dec.decide([g["a"] for g in group], [g["b"] for g in group], lambda x: x)
        agree = np.array([keys_agree(g["a"], g["b"]) for g in group])
        by = defaultdict(list)
        for g, above, ok in zip(group, d["above"], agree):
            by[g["kind"]].append((bool(above), bool(above and ok)))
        kinds = {k: {"n": len(v), "without_guard": float(np.mean([x for x, _ in v])),
                     "with_guard": float(np.mean([y for _, y in v]))} for k, v in by.items()}
        total = {"n": len(group), "without_guard": float(d["above"].mean()),
                 "with_guard": float((d["above"] & agree).mean()),
                 "keys_agree": float(agree.mean())}
        out[name] = {"total": total, "by_kind": kinds}
        rows.append([name, len(group), total["without_guard"], total["with_guard"]])
        for k, v in sorted(kinds.items()):
            rows.append([f"  {k}", v["n"], v["without_guard"], v["with_guard"]])
    print_table("A. key guard — share of pairs the cache would serve (shipped thresholds)",
                ["pairs", "n", "served without guard", "served with guard"], rows)
    return out


def passage_of(paras: list[str], tokens: int) -> str:
    text = ""
    for p in paras:
        if len(text) >= 4 * tokens:
            break
        text = f"{text}\n\n{p}" if text else p
    return text[: 4 * tokens].rsplit(" ", 1)[0] if tokens else ""


def part_b(emb, dec: Decider, seed: int, n: int) -> dict:
    rng = random.Random(seed)
    arts = [a for a in squad_dev() if sum(len(p["qas"]) for p in a["paragraphs"]) >= 4]
    rng.shuffle(arts)
    arts = arts[:n]
    out, rows = {}, []
    for L in LENGTHS:
        p1, p2, p3 = [], [], []
        for a in arts:
            qs = rng.sample([q["question"] for p in a["paragraphs"] for q in p["qas"]], 2)
            passage = passage_of([p["context"] for p in a["paragraphs"]], L)
            join = (lambda q: f"{passage}\n\n{q}") if passage else (lambda q: q)
            p1.append(join(qs[0]))
            p2.append(join(qs[1]))
            p3.append(join(casual(qs[0], rng)))
        res = {}
        for label, part, use_rest in (("before (whole prompt embedded)", lambda x: x, False),
                                      ("now (question embedded, passage identical)", focus,
                                       True)):
            fh = dec.decide(p1, p2, part)["above"]
            ph = dec.decide(p1, p3, part)["above"]
            if use_rest:
                fh = fh & np.array([same_rest(x, y) and keys_agree(focus(x), focus(y))
                                    for x, y in zip(p1, p2)])
                ph = ph & np.array([same_rest(x, y) and keys_agree(focus(x), focus(y))
                                    for x, y in zip(p1, p3)])
            res[label] = {"false_hit_rate": float(fh.mean()), "paraphrase_hit_rate":
                          float(ph.mean())}
            rows.append([L, label, float(fh.mean()), float(ph.mean())])
        out[str(L)] = res
    print_table(f"B. passage + question in one prompt — {n} SQuAD articles per length",
                ["passage tokens", "keying", "false hits (other question)",
                 "hits (same question, rewritten)"], rows)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-domain", type=int, default=300)
    ap.add_argument("--articles", type=int, default=48)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    emb = TransformerEmbedder()
    dec = Decider(emb)
    a = part_a(emb, dec, args.seed, args.per_domain)
    b = part_b(emb, dec, args.seed, args.articles)
    write_json("semantic_guard", {"benchmark": "semantic_guard", "embedder": emb.name,
                                  "key_guard": a, "long_prompts": b,
                                  "thresholds": {c: p.threshold for c, p in dec.pol.items()}},
               args.out)


if __name__ == "__main__":
    main()
