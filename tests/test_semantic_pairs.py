"""The multi-domain labelled set: answer keys say which hits are right; no query repeats a stored
text. (Templated domains only: the others read data sets that are downloaded, see the benchmark.)"""

from __future__ import annotations

import random

from benchmarks.semantic_pairs import code_pairs, dedupe, make_up, math_pairs


def test_answer_keys_mark_paraphrases_and_near_misses():
    rng = random.Random(0)
    pairs = code_pairs(rng, 60) + math_pairs(rng, 60)
    assert {p["domain"] for p in pairs} == {"code", "math"}
    for p in pairs:
        assert (p["ans_a"] == p["ans_b"]) == p["pos"], p
        assert p["a"] != p["b"]
    kinds = make_up(pairs)
    assert kinds["code"]["paraphrase"] == 60 and kinds["math"]["paraphrase"] == 60
    assert kinds["math"]["number changed"] > 50
    assert kinds["code"].get("other language", 0) + kinds["code"].get("other task", 0) == 60


def test_dedupe_drops_queries_that_are_stored_or_repeated():
    pairs = [
        {"a": "How do I X in Go?", "b": "how do i x in go", "pos": True},
        {"a": "How do I Y in Go?", "b": "How do I X in Go?", "pos": False},  # a stored text
        {"a": "How do I Z in Go?", "b": "How do I X in go?", "pos": False},  # stored, other case
        {"a": "How do I W in Go?", "b": "how do i x in go", "pos": False},  # repeated query
        {"a": "How do I V in Go?", "b": "How do I V in Rust?", "pos": False},
    ]
    kept = dedupe(pairs)
    assert [p["b"] for p in kept] == ["how do i x in go", "How do I V in Rust?"]
