"""What of a prompt the semantic cache embeds: the question, not the passage in front of it.

The sentence embedder reads its first 256 tokens. A prompt made of a passage and then a
question ("<document>\n\nWhat does it say about X?") was embedded as the passage alone once
the passage filled that window — and any other question over the same passage looked identical
(a false hit every time for passages of 250+ tokens; 59 % of the time for shorter ones, where
the passage still dominated the vector).

So a prompt splits into its *focus* and the *rest*: the focus is the last paragraph or line
(or, in one long paragraph, its last sentences, up to ``FOCUS_CHARS``), the rest everything
before it. Only the focus is embedded; the rest has to be identical, character for character, for an
entry to be served (``same_rest``) — the same rule the context fingerprint applies to documents
given separately. Short prompts and prompts whose rest is a few words ("Hi!\n\n...") are
embedded whole, as before.
"""

from __future__ import annotations

import re

import xxhash

FOCUS_CHARS = 600  # at most this much of the end is embedded (~150 tokens)
WHOLE_CHARS = 1000  # one paragraph up to this long is embedded whole (~the embedder's window)
MIN_REST_CHARS = 200  # a shorter rest is embedded with the focus (a greeting, a label)
_SENTENCE_END = re.compile(r"(?<=[.!?。！？])\s+")


def split(text: str) -> tuple[str, str]:
    """(rest, focus) of ``text``; rest is "" when the whole text is embedded."""
    body = text.rstrip()
    cut = next((c for c in (body.rfind("\n\n"), body.rfind("\n"))
                if 0 < c and len(body) - c <= FOCUS_CHARS and body[c:].strip()), -1)
    if cut > 0:
        pass  # the last paragraph (or line) is the focus
    elif len(body) > WHOLE_CHARS:
        # one long paragraph, or a last paragraph longer than the focus: its last sentences
        start = len(body) - FOCUS_CHARS
        m = _SENTENCE_END.search(body, start)
        cut = m.end() if m and m.end() < len(body) else start
    else:
        return "", text
    if cut < MIN_REST_CHARS:
        return "", text
    return body[:cut], body[cut:].strip()


def focus(text: str) -> str:
    """The part of ``text`` to embed."""
    return split(text)[1]


def rest_key(text: str) -> str:
    """Hash of the part of ``text`` that is not embedded ("" when all of it is)."""
    rest = split(text)[0]
    return xxhash.xxh3_64_hexdigest(rest.encode()) if rest else ""


def same_rest(a: str, b: str) -> bool:
    return rest_key(a) == rest_key(b)
