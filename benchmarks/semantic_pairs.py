"""The multi-domain labelled set for the semantic cache: per category, pairs (stored ``a``,
looked-up ``b``) that should hit (same answer) or must not (another answer).

Built from offline sources (``ctxcache.datasets``) plus templates; every near-miss is a request a
real user could send that needs a different answer:

| domain | source | should hit (paraphrase) | must not hit (near-miss) |
|---|---|---|---|
| code | templated programming questions (13 tasks × 9 languages × 5 phrasings) | another phrasing of the same task and language (half also casually rewritten) | same phrasing, another language; same language, another task |
| math | templated arithmetic / algebra (8 forms × 2 phrasings, random numbers) | the other phrasing of the same numbers | one number changed |
| factual | SQuAD v1.1 dev questions | a casual rewrite | another question on the same paragraph |
| factual | VitaminC contrastive claims, asked as "Is it true that …?" | a casual rewrite | the claim's twin: one fact changed, opposite verdict on the same evidence |
| conversation | Topical-Chat opening lines (real chit-chat) | a casual rewrite | the most similar *other* opening line (MiniLM, similarity 0.6–0.95) |
| support | ``fow-cache`` labelled pairs (human-written) | paraphrases / near repeats | negations, entity, number/date and scope swaps |

Casual rewrites (``semantic.rewrite.casual``) change surface only: case, punctuation, fillers,
contractions, chat abbreviations, one typo. One stored entry per distinct ``a``; a query that is
itself a stored text is dropped (it would rightly hit that entry).
"""

from __future__ import annotations

import random
from typing import Callable

import numpy as np

from ctxcache.datasets import fow_pairs, squad_dev, topical_chat_lines, vitaminc_contrastive
from ctxcache.semantic.rewrite import casual

TASKS = ["read a file line by line", "sort a list of objects by a field", "parse a JSON string",
         "make an HTTP GET request", "reverse a string", "catch an exception",
         "write a unit test", "merge two dictionaries", "start a background thread",
         "connect to a PostgreSQL database", "format a date as ISO 8601",
         "remove duplicates from a list", "match a regular expression"]
LANGS = ["Python", "JavaScript", "Rust", "Go", "Java", "C++", "TypeScript", "Ruby", "C#"]
CODE_FORMS = ["How do I {t} in {l}?", "What's the best way to {t} using {l}?",
              "{l}: how can I {t}?", "In {l}, how would you {t}?",
              "Show me how to {t} in {l}."]
MATH_FORMS = [  # (form A, form B) of the same question
    ("What is {a} times {b}?", "Compute {a} multiplied by {b}."),
    ("What is {a} plus {b}?", "Add {a} and {b}."),
    ("What is {a}% of {c}?", "Calculate {a} percent of {c}."),
    ("Is {c} a prime number?", "Tell me whether {c} is prime."),
    ("Solve for x: {a}x + {b} = {c}.", "Find x if {a}x + {b} = {c}."),
    ("What is the square root of {sq}?", "Compute sqrt({sq})."),
    ("What is {c} divided by {a}?", "Divide {c} by {a}."),
    ("What is {a} squared?", "Compute {a} to the power of 2."),
]


SOURCE_OF = {"code": "templated code", "math": "templated math",
             "conversation": "topical-chat", "support": "fow-cache"}


def _pair(a, b, pos, domain, kind, ans_a=None, ans_b=None, source=None):
    """``ans_a`` / ``ans_b``: keys of the answers the two requests need (equal iff ``pos``);
    by default the texts themselves. A hit is right when the served entry's key is ``ans_b``,
    so a near-miss that happens to ask what *another* stored entry answers may hit that one."""
    ans_a = ans_a or f"{domain}:{a}"
    ans_b = ans_b or (ans_a if pos else f"{domain}:{b}")
    return {"a": a, "b": b, "pos": bool(pos), "domain": domain, "kind": kind,
            "ans_a": ans_a, "ans_b": ans_b, "source": source or SOURCE_OF.get(domain, domain)}


def code_pairs(rng: random.Random, n: int) -> list[dict]:
    out = []
    for _ in range(n):
        t, lang = rng.choice(TASKS), rng.choice(LANGS)
        fa, fb = rng.sample(CODE_FORMS, 2)
        a = fa.format(t=t, l=lang)
        b = fb.format(t=t, l=lang)
        key = f"code:{t}:{lang}"
        out.append(_pair(a, casual(b, rng) if rng.random() < 0.5 else b, True, "code",
                         "paraphrase", key, key))
        if rng.random() < 0.5:
            other = rng.choice([x for x in LANGS if x != lang])
            out.append(_pair(a, fa.format(t=t, l=other), False, "code", "other language",
                             key, f"code:{t}:{other}"))
        else:
            other = rng.choice([x for x in TASKS if x != t])
            out.append(_pair(a, fa.format(t=other, l=lang), False, "code", "other task",
                             key, f"code:{other}:{lang}"))
    return out


def math_pairs(rng: random.Random, n: int) -> list[dict]:
    out = []
    for _ in range(n):
        k = rng.randrange(len(MATH_FORMS))
        fa, fb = MATH_FORMS[k]
        if rng.random() < 0.5:
            fa, fb = fb, fa
        v = {"a": rng.randint(2, 99), "b": rng.randint(2, 99), "c": rng.randint(100, 999)}
        v["sq"] = v["a"] ** 2

        def key(x):
            return f"math:{k}:" + fa.format(**x)

        out.append(_pair(fa.format(**v), fb.format(**v), True, "math", "paraphrase",
                         key(v), key(v)))
        w = dict(v)
        name = rng.choice([n for n in ("a", "b", "c") if "{" + n + "}" in fa] or ["a"])
        w[name] = v[name] + rng.choice([-3, -2, -1, 1, 2, 3])
        w["sq"] = w["a"] ** 2
        if fa.format(**w) != fa.format(**v):
            out.append(_pair(fa.format(**v), fa.format(**w), False, "math", "number changed",
                             key(v), key(w)))
    return out


def squad_pairs(rng: random.Random, n: int) -> list[dict]:
    paras = [p for art in squad_dev() for p in art["paragraphs"] if len(p["qas"]) >= 3]
    rng.shuffle(paras)
    out = []
    for p in paras[:n]:
        q1, q2, q3 = (q["question"] for q in rng.sample(p["qas"], 3))
        out.append(_pair(q1, casual(q1, rng), True, "factual", "paraphrase", source="squad"))
        out.append(_pair(q2, q3, False, "factual", "same passage, other question",
                         source="squad"))
    return out


def vitaminc_pairs(rng: random.Random, n: int) -> list[dict]:
    twins = vitaminc_contrastive()
    rng.shuffle(twins)
    out = []
    for t, f in twins[:n]:
        a, b = (t, f) if rng.random() < 0.5 else (f, t)
        ask = "Is it true that {}?".format
        a, b = ask(a.rstrip(" .")), ask(b.rstrip(" ."))
        out.append(_pair(a, casual(a, rng), True, "factual", "paraphrase", source="vitaminc"))
        out.append(_pair(a, b, False, "factual", "contrastive claim", source="vitaminc"))
    return out


def conversation_pairs(rng: random.Random, n: int, embed: Callable) -> list[dict]:
    lines = topical_chat_lines()
    rng.shuffle(lines)
    lines = lines[: 4 * n]
    v = embed(lines)
    sims = v @ v.T
    np.fill_diagonal(sims, -1)
    out = []
    for i in range(min(n, len(lines))):
        out.append(_pair(lines[i], casual(lines[i], rng), True, "conversation", "paraphrase"))
        order = np.argsort(-sims[i])
        j = next((int(j) for j in order if 0.6 <= sims[i, j] <= 0.95
                  and lines[j].lower() != lines[i].lower()), None)
        if j is not None:
            out.append(_pair(lines[i], lines[j], False, "conversation", "other opening line"))
    return out


def support_pairs() -> list[dict]:
    return [_pair(p["a"], p["b"], p["same_answer"], "support",
                  "paraphrase" if p["same_answer"] else "labelled near-miss")
            for p in fow_pairs()]


def multidomain_pairs(embed: Callable, seed: int = 0, per_domain: int = 300) -> list[dict]:
    """The whole set (see the module docstring), deduplicated, in a fixed order."""
    rng = random.Random(seed)
    raw = (code_pairs(rng, per_domain) + math_pairs(rng, per_domain)
           + squad_pairs(rng, per_domain // 2) + vitaminc_pairs(rng, per_domain // 2)
           + conversation_pairs(rng, per_domain, embed) + support_pairs())
    return dedupe(raw)


def dedupe(pairs: list[dict]) -> list[dict]:
    """One stored entry per distinct ``a`` is kept for each (a, b); queries equal to a stored
    text are dropped; so is a pair whose ``b`` repeats an earlier query."""
    stored = {p["a"].strip().lower() for p in pairs}
    seen_q, out = set(), []
    for p in pairs:
        q = p["b"].strip().lower()
        if q in stored or q in seen_q or q == p["a"].strip().lower():
            continue
        seen_q.add(q)
        out.append(p)
    return out


def make_up(pairs: list[dict]) -> dict:
    """Counts per domain and kind (for the README and the JSON)."""
    out: dict[str, dict[str, int]] = {}
    for p in pairs:
        d = out.setdefault(p["domain"], {})
        d[p["kind"]] = d.get(p["kind"], 0) + 1
    return out
