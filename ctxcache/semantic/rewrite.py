"""Casual and disfluent rewrites of a request: how real users re-ask the same thing.

Used to train the category classifier on noisier text (so a question keeps its category when
it is asked casually) and to measure that stability. The rewrites change surface form only —
case, punctuation, fillers, contractions, chat abbreviations, one typo — never the meaning.
"""

from __future__ import annotations

import random
import re

PREFIXES = ("hey ", "um ", "so ", "quick question: ", "hi, ", "ok so ", "yo ", "uh, ",
            "can you tell me ", "i was wondering ", "hey so ", "sorry, ", "btw ", "question - ")
SUFFIXES = (" lol", " pls", " thx", "??", " ...", " thanks!", " asap", " :)", " haha", " ?")
SWAPS = ((r"\bwhat is\b", "whats"), (r"\bwhat's\b", "whats"), (r"\bdo not\b", "dont"),
         (r"\byou\b", "u"), (r"\byour\b", "ur"), (r"\bplease\b", "pls"), (r"\bare\b", "r"),
         (r"\bhow do i\b", "how to"), (r"\bcan you\b", "can u"), (r"\bi am\b", "im"),
         (r"\bbecause\b", "cuz"), (r"\bto\b", "2"))


def casual(text: str, rng: random.Random) -> str:
    """One random casual rewrite of ``text`` (same meaning, different surface)."""
    t = text.strip()
    if rng.random() < 0.7:
        t = t.lower()
    if rng.random() < 0.6:
        t = t.rstrip("?.!")
    for pat, rep in SWAPS:
        if rng.random() < 0.35:
            t = re.sub(pat, rep, t, flags=re.IGNORECASE)
    if rng.random() < 0.6:
        t = rng.choice(PREFIXES) + t
    if rng.random() < 0.4:
        t = t + rng.choice(SUFFIXES)
    if rng.random() < 0.3:  # one typo: two neighbouring letters swapped in a longer word
        words = t.split(" ")
        long = [i for i, w in enumerate(words) if len(w) > 4 and w.isalpha()]
        if long:
            i = rng.choice(long)
            w = words[i]
            j = rng.randrange(1, len(w) - 2)
            words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2:]
            t = " ".join(words)
    return t if t.strip() else text
