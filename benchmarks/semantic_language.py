"""Semantic cache on non-English traffic: false hits between unrelated questions in other
languages with the packaged English embedder, with and without the language gate; and what the
gate costs on English traffic (share of English texts it would serve uncached).

benchmarks/data/multilingual_questions.json: 10 unrelated everyday questions in each of 8
languages; the first 5 of every language are stored in one cache and the other 5 looked up:
every hit is a false hit. English cost: the gate over the 1,576 English texts the category classifier is
trained and tested on (SQuAD and chatterbot questions, code requests, chit-chat, maths,
casual rewrites).

    python benchmarks/semantic_language.py
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import print_table, write_json  # noqa: E402
from benchmarks.semantic_categories import dataset  # noqa: E402
from ctxcache.semantic import SemanticCache, TransformerEmbedder  # noqa: E402
from ctxcache.semantic.cache import CacheRequest  # noqa: E402
from ctxcache.semantic.classifier import load_examples  # noqa: E402
from ctxcache.semantic.language import LanguageGate  # noqa: E402

DATA = Path(__file__).resolve().parent / "data" / "multilingual_questions.json"


def false_hits(embedder, gate) -> dict:
    """One tenant stores the first 5 questions of every language (40 entries); the other 5 of
    each language are looked up — every hit is a false hit."""
    data = json.loads(DATA.read_text())
    per = {}
    with tempfile.TemporaryDirectory() as d:
        cache = SemanticCache(embedder, db_url=f"sqlite:///{d}/s.db", language_gate=gate)
        for qs in data.values():
            for q in qs[:5]:
                cache.insert(CacheRequest(q), {"text": f"answer to {q}"})
        for lang, qs in data.items():
            per[lang] = sum(cache.lookup(CacheRequest(q)).hit is not None
                            for q in qs[5:]) / len(qs[5:])
        cache.close()
    return per


def main() -> None:
    emb = TransformerEmbedder()
    off = false_hits(emb, None)
    on = false_hits(emb, LanguageGate(("en",)))
    gate = LanguageGate(("en",))
    english = sorted({row[0] for row in dataset(0)} | {t for t, _ in load_examples()})
    t0 = time.perf_counter()
    verdicts = [gate.check(t) for t in english]
    per_text_ms = (time.perf_counter() - t0) / len(english) * 1e3
    refused = [(t, v.language, round(v.confidence, 3)) for t, v in zip(english, verdicts)
               if not v.covered]
    rows = [[lang, off[lang], on[lang]] for lang in off]
    rows.append(["all", sum(off.values()) / len(off), sum(on.values()) / len(on)])
    print_table("false-hit rate between unrelated questions (stored 5, looked up 5 others)",
                ["language", "no gate", "language gate"], rows)
    print(f"\nEnglish texts served uncached by the gate: {len(refused)} of {len(english)} "
          f"({len(refused) / len(english):.2%}); {per_text_ms:.3f} ms per check")
    for t, lang, c in refused[:10]:
        print(f"  {lang} {c}: {t}")
    write_json("semantic_language", {
        "benchmark": "semantic_language", "false_hit_rate_no_gate": off,
        "false_hit_rate_gate": on, "english_texts": len(english),
        "english_refused": len(refused), "english_refused_share": len(refused) / len(english),
        "english_refused_examples": refused[:20], "gate_ms_per_text": per_text_ms})


if __name__ == "__main__":
    main()
