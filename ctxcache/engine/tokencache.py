"""Incremental tokenization of chat prompts: only the messages not seen before are tokenized.

An agent loop or a chat resends its whole conversation every turn, so re-tokenizing the
rendered prompt costs time linear in the conversation on every request (milliseconds at a few
thousand tokens, more than the prefill of the new tokens it is all for). HF tokenizers split
their input at added tokens (``<|im_start|>``, ``<|im_end|>``, …) before normalizing and
pre-tokenizing each section on its own, so a text cut just before each added token can be
tokenized piece by piece with the same result — and every piece an earlier request had (the
system prompt with its tools, each earlier message) comes from a cache.

That equivalence fails in two cases, both checked on the tokenizer's own description: an added
token that strips whitespace on its left (the whitespace belongs to the piece before it), and a
Metaspace pre-tokenizer that adds a prefix only to the first section of the input. There the
whole text is tokenized as before. The first text of each tokenizer is also tokenized both
ways and compared; a mismatch turns piecewise tokenization off for it.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict

log = logging.getLogger("ctxcache.tokencache")


def _piecewise_safe(tok) -> bool:
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None or not getattr(tok, "is_fast", False):
        return False
    added = getattr(tok, "added_tokens_decoder", None) or {}
    if any(getattr(t, "lstrip", False) for t in added.values()):
        return False
    return "Metaspace" not in repr(backend.pre_tokenizer)


class PieceTokenizer:
    """``encode(text)`` → (token ids, start offset of each token), cached per piece."""

    def __init__(self, tok, max_chars: int = 16 << 20):
        self.tok = tok
        self.max_chars = max_chars  # text kept in the cache (least recently used goes first)
        self._chars = 0
        self._cache: OrderedDict[str, tuple[list[int], list[int]]] = OrderedDict()
        self._lock = threading.Lock()
        self.enabled = _piecewise_safe(tok)
        self._verified = False
        self.hits = self.misses = 0
        added = sorted(getattr(tok, "added_tokens_encoder", {}) or {}, key=len, reverse=True)
        self._split = re.compile("|".join(map(re.escape, added))) if added else None
        if self._split is None:
            self.enabled = False

    def _whole(self, text: str) -> tuple[list[int], list[int]]:
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [int(a) for a, _ in enc["offset_mapping"]]

    def _pieces(self, text: str) -> list[str]:
        cuts = [m.start() for m in self._split.finditer(text)]
        bounds = [0] + [c for c in cuts if c > 0] + [len(text)]
        return [text[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]

    def encode(self, text: str) -> tuple[list[int], list[int]]:
        if not self.enabled:
            return self._whole(text)
        ids: list[int] = []
        starts: list[int] = []
        at = 0
        for piece in self._pieces(text):
            with self._lock:
                got = self._cache.get(piece)
                if got is not None:
                    self._cache.move_to_end(piece)
                    self.hits += 1
            if got is None:
                got = self._whole(piece)
                with self._lock:
                    self.misses += 1
                    if piece not in self._cache:
                        self._chars += len(piece)
                    self._cache[piece] = got
                    while self._chars > self.max_chars and self._cache:
                        old, _ = self._cache.popitem(last=False)
                        self._chars -= len(old)
            ids.extend(got[0])
            starts.extend(s + at for s in got[1])
            at += len(piece)
        if not self._verified:
            self._verified = True
            if (ids, starts) != self._whole(text):
                log.warning("piecewise tokenization differs for %s: tokenizing whole prompts",
                            type(self.tok).__name__)
                self.enabled = False
                with self._lock:
                    self._cache.clear()
                    self._chars = 0
                return self._whole(text)
        return ids, starts
