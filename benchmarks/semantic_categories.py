"""Category classifier: train it on more and noisier data, and measure what categories cost.

Data (all installable offline, see ``ctxcache.datasets``), mapped to the cache's categories:
* factual — SQuAD v1.1 dev questions, chatterbot ``trivia``/``science``/``history``/``literature``;
* code — chatterbot ``coding``, the repo's labelled examples, templated programming questions;
* conversation — chatterbot ``greetings``/``conversations``/``emotion``/``humor``/``gossip``/
  ``botprofile``/``psychology``/``ai``;
* other — ``fow-cache`` customer-support questions, chatterbot ``tech_support``, the repo's
  examples and templated advice/recommendation requests;
* math, creative — the repo's examples and templates (no offline corpus has them).
Every training text is also added as two casual rewrites (``semantic.rewrite``). 25 % of each
source is held out.

Reported: held-out per-category precision / recall; how often a casual rewrite changes the
predicted category (the failure that hid paraphrases from a per-category index), for the
classifier trained on the repo's 144 examples vs the new one; and paraphrase recall@1 — the share
of casual rewrites whose original is the nearest entry searched — with the index partitioned by
(predicted) category vs one index per tenant. Writes the trained weights to
``ctxcache/semantic/data/classifier.npz`` (``--save``) and JSON to ``benchmarks/results``.

    python benchmarks/semantic_categories.py --save
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks.common import environment, print_table, write_json  # noqa: E402
from ctxcache.datasets import chatterbot_corpus, fow_pairs, squad_dev  # noqa: E402
from ctxcache.semantic import CentroidClassifier, TransformerEmbedder, load_examples  # noqa: E402
from ctxcache.semantic.classifier import CLASSIFIER_FILE, DEFAULT_CATEGORIES  # noqa: E402
from ctxcache.semantic.rewrite import casual  # noqa: E402

CHATTER = {"trivia": "factual", "science": "factual", "history": "factual",
           "literature": "factual", "coding": "code", "greetings": "conversation",
           "conversations": "conversation", "emotion": "conversation", "humor": "conversation",
           "gossip": "conversation", "botprofile": "conversation", "psychology": "conversation",
           "ai": "conversation", "tech_support": "other"}


def templates(rng: random.Random) -> list[tuple[str, str]]:
    langs = ["Python", "JavaScript", "Rust", "Go", "Java", "C++", "TypeScript", "SQL", "bash"]
    tasks = ["read a file line by line", "sort a list of objects by a field", "parse JSON",
             "make an HTTP request", "reverse a string", "handle exceptions", "write a unit test",
             "merge two dictionaries", "spawn a thread", "connect to a database",
             "format a date", "remove duplicates from a list", "use a regular expression"]
    out = [(f"How do I {t} in {lang}?", "code") for t in tasks for lang in langs]
    out += [(f"Why does my {lang} code raise {e}?", "code") for lang in langs for e in (
        "a null pointer error", "an index out of range error", "a type error",
        "a segmentation fault", "a timeout")]
    for _ in range(150):
        a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(100, 999)
        out.append((rng.choice([
            f"What is {a} times {b}?", f"Solve for x: {a}x + {b} = {c}.",
            f"What is {a}% of {c}?", f"Is {c} a prime number?", f"Simplify {a}/{b}.",
            f"What is the derivative of x^{a % 9 + 2}?", f"Integrate x^{a % 7 + 1} dx.",
            f"What is the square root of {a * a}?", f"Compute {a}^{b % 4 + 2} mod {b}.",
            f"What is the probability of getting {a % 5 + 1} heads in {a % 5 + 3} tosses?"]),
            "math"))
    forms = ["poem", "short story", "haiku", "song", "limerick", "fairy tale", "speech",
             "dialogue", "slogan", "opening paragraph"]
    topics = ["the sea", "a lost robot", "autumn", "friendship", "a dragon", "the city at night",
              "coffee", "a rainy Monday", "space travel", "an old lighthouse"]
    out += [(f"Write a {f} about {t}.", "creative") for f in forms for t in topics]
    advice = ["sleeping better", "a job interview", "saving money", "moving house",
              "a first marathon", "learning to cook", "working from home", "a long flight",
              "keeping houseplants alive", "a road trip"]
    things = ["laptop for students", "book for a beach holiday", "gift for my sister",
              "board game for four people", "running shoe", "podcast about history"]
    out += [(f"Give me tips for {a}.", "other") for a in advice]
    out += [(f"Can you recommend a {t}?", "other") for t in things]
    out += [(f"How do I {h}?", "other") for h in (
        "get a coffee stain out of a white shirt", "change a flat tyre", "cancel my order",
        "update my billing address", "return a damaged item", "unclog a sink")]
    return out


def dataset(seed: int) -> list[tuple[str, str, str]]:
    """(text, category, source) without duplicates."""
    rng = random.Random(seed)
    rows = [(t, c, "repo") for t, c in load_examples()]
    qs = [qa["question"] for a in squad_dev() for p in a["paragraphs"] for qa in p["qas"]]
    rng.shuffle(qs)
    rows += [(q, "factual", "squad") for q in qs[:600]]
    for name, texts in chatterbot_corpus().items():
        if name in CHATTER:
            rows += [(t, CHATTER[name], f"chatterbot/{name}") for t in texts][:300]
    support = sorted({p["a"] for p in fow_pairs()})
    rng.shuffle(support)
    rows += [(t, "other", "fow-cache") for t in support[:300]]
    rows += [(t, c, "templates") for t, c in templates(rng)]
    seen, out = set(), []
    for t, c, src in rows:
        k = t.strip().lower()
        if k and k not in seen:
            seen.add(k)
            out.append((t, c, src))
    return out


def prf(pred, gold, cats) -> dict:
    out = {}
    for c in cats:
        tp = sum(p == c and g == c for p, g in zip(pred, gold))
        fp = sum(p == c and g != c for p, g in zip(pred, gold))
        fn = sum(p != c and g == c for p, g in zip(pred, gold))
        out[c] = {"precision": tp / (tp + fp) if tp + fp else None,
                  "recall": tp / (tp + fn) if tp + fn else None, "support": tp + fn}
    return out


def recall_at_1(emb_orig, emb_rw, cat_orig, cat_rw, partitioned: bool) -> float:
    """Share of rewrites whose nearest stored original (exact search) is their own."""
    sims = emb_rw @ emb_orig.T
    if partitioned:
        mask = np.asarray(cat_rw)[:, None] == np.asarray(cat_orig)[None, :]
        sims = np.where(mask, sims, -np.inf)
    return float((sims.argmax(1) == np.arange(len(emb_rw))).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", action="store_true", help="write the shipped classifier weights")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    emb = TransformerEmbedder()
    cats = list(DEFAULT_CATEGORIES)
    data = dataset(args.seed)
    by_src = collections.defaultdict(list)
    for r in data:
        by_src[r[2]].append(r)
    train, test = [], []
    for rows in by_src.values():
        rng.shuffle(rows)
        k = max(1, len(rows) // 4)
        test += rows[:k]
        train += rows[k:]
    # the previous classifier: the repo's examples only (its held-out part excluded)
    test_texts = {t for t, _, _ in test}
    repo = [(t, c) for t, c, s in train if s == "repo" and t not in test_texts]
    old = CentroidClassifier.train(emb.embed([t for t, _ in repo]), [c for _, c in repo], cats)
    # the hand-labelled examples define the categories: trusted 5×; categories balanced
    aug = [(t, c, 5.0 if s == "repo" else 1.0) for t, c, s in train]
    aug += [(casual(t, rng), c, w) for t, c, w in aug for _ in range(2)]
    new = CentroidClassifier.train(emb.embed([t for t, _, _ in aug]), [c for _, c, _ in aug],
                                   cats, weights=[w for _, _, w in aug], balanced=True)
    x_test = emb.embed([t for t, _, _ in test])
    gold = [c for _, c, _ in test]
    rewrites = [casual(t, random.Random(args.seed + i)) for i, (t, _, _) in enumerate(test)]
    x_rw = emb.embed(rewrites)
    repo_test = [i for i, (_, _, s) in enumerate(test) if s == "repo"]
    rows, summary = [], {}
    for name, clf in (("repo examples (144, before)", old), ("more + noisier data (now)", new)):
        p_orig, p_rw = clf.predict(x_test), clf.predict(x_rw)
        acc_repo = float(np.mean([p_orig[i] == gold[i] for i in repo_test]))
        flips = float(np.mean([a != b for a, b in zip(p_orig, p_rw)]))
        acc = float(np.mean([p == g for p, g in zip(p_orig, gold)]))
        acc_rw = float(np.mean([p == g for p, g in zip(p_rw, gold)]))
        r_part = recall_at_1(x_test, x_rw, p_orig, p_rw, True)
        r_all = recall_at_1(x_test, x_rw, p_orig, p_rw, False)
        summary[name] = {"accuracy": acc, "accuracy_on_rewrites": acc_rw,
                         "accuracy_hand_labelled": acc_repo,
                         "category_flip_rate": flips, "recall_at_1_partitioned": r_part,
                         "recall_at_1_one_index": r_all, "per_category": prf(p_orig, gold, cats)}
        rows.append([name, acc, acc_repo, acc_rw, flips, r_part, r_all])
    print_table(f"category classifier — {len(train)} training texts (+2 rewrites each), "
                f"{len(test)} held out",
                ["classifier", "accuracy", "on hand-labelled", "accuracy on rewrites",
                 "category flips on rewrite",
                 "recall@1 per-category index", "recall@1 one index"], rows)
    pc = summary["more + noisier data (now)"]["per_category"]
    print_table("held-out precision / recall (now)", ["category", "precision", "recall",
                                                      "support"],
                [[c, v["precision"], v["recall"], v["support"]] for c, v in pc.items()])
    if args.save:
        np.savez(CLASSIFIER_FILE, categories=np.array(cats), weights=new.weights,
                 bias=new.bias, embedder=np.array(emb.name), dim=np.array(emb.dim))
        print(f"wrote {CLASSIFIER_FILE}")
    write_json("semantic_categories", {
        "benchmark": "semantic_categories", "train": len(train), "test": len(test),
        "sources": {k: len(v) for k, v in by_src.items()}, "summary": summary,
        "env": environment("cpu")}, args.out)


if __name__ == "__main__":
    main()
