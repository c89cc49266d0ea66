"""Incremental detokenization with stop sequences.

Tokens do not map one-to-one to text: a multi-byte character may span tokens, and a stop string
may span tokens too. So text is decoded from all generated ids each step, a trailing partial
character is held back, and so is any tail that could still grow into a stop string — the client
never receives text that a stop string later cuts off.
"""

from __future__ import annotations

from typing import Callable, Sequence


class TextStream:
    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = ()):
        self.decode = decode
        self.stop = list(stop)
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already handed out
        self.text = ""
        self.stopped = False

    def _holdback(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    best = max(best, n)
                    break
        return best

    def push(self, token_id: int) -> str:
        """Add one token; return the new text that is safe to emit."""
        self.ids.append(token_id)
        text = self.decode(self.ids)
        for s in self.stop:
            at = text.find(s)
            if at != -1:
                self.stopped = True
                text = text[:at]
        self.text = text
        if self.stopped:
            return self._take(len(text))
        end = len(text)
        if text.endswith("\ufffd"):  # incomplete multi-byte character
            end = len(text.rstrip("\ufffd"))
        end -= self._holdback(text[:end])
        return self._take(end)

    def flush(self) -> str:
        """At the end of generation: whatever is held back is final text."""
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        out = self.text[self.emitted:end]
        self.emitted = end
        return out
