"""Which texts the embedder can compare: a language gate in front of the semantic cache.

The packaged MiniLM embedder was trained on English. On other languages its vectors crowd
together, so unrelated questions look alike and a semantic hit would be a wrong answer. The gate
identifies the language (py3langid: a small n-gram model shipped in the package, ~0.05 ms per
text); a text confidently in a language the embedder does not cover is served uncached (no hit,
no insert). Short or symbol-heavy texts (code, formulas, "hi") get low confidence and pass:
their embedding is as good as the English one, and the per-category thresholds still apply.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Sequence

_IDENTIFIER = None
_LOCK = threading.Lock()


def _identifier():
    global _IDENTIFIER
    with _LOCK:
        if _IDENTIFIER is None:
            from py3langid.langid import MODEL_FILE, LanguageIdentifier

            _IDENTIFIER = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    return _IDENTIFIER


@dataclass(frozen=True)
class Verdict:
    covered: bool
    language: str
    confidence: float


class LanguageGate:
    def __init__(self, covered: Sequence[str] = ("en",), min_confidence: float = 0.5):
        self.covered = frozenset(covered)
        self.min_confidence = min_confidence

    def check(self, text: str) -> Verdict:
        lang, conf = _identifier().classify(text)
        conf = float(conf)
        return Verdict(lang in self.covered or conf < self.min_confidence, lang, conf)


def gate_for(embedder) -> LanguageGate | None:
    """The gate an embedder needs: none when it declares itself multilingual
    (``languages = None``), else its languages (English when it says nothing)."""
    langs = getattr(embedder, "languages", ("en",))
    return None if langs is None else LanguageGate(langs)
