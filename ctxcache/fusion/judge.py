"""How ``auto`` decides that a reuse strategy is safe: by the answers users would see.

The first-token check (top-1 of the next-token distribution) is blind to what matters at long
context — a reused K/V can agree on the first token ("The") and lose the fact after it — and is
too strict elsewhere (bf16 noise flips a near-tie first token of an otherwise equal answer). So
on a shadow-checked request the planner decodes a short greedy answer from both the strategy's
K/V and full prefill's, and scores their agreement as token F1 (SQuAD's answer metric, over
token ids: language-independent). A strategy is proven for a context-length bucket when the
Wilson lower confidence bound of its agreement rate (answers with F1 ≥ ``agree_f1``) reaches
the planner's threshold: a bound, not a mean, so ten lucky samples do not prove a strategy.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from ctxcache.fusion.types import FusionResult

# context-length buckets (prompt tokens): a strategy proven at 4K is not thereby proven at 32K
BUCKETS = (4096, 8192, 16384, 32768)


def bucket_of(n_tokens: int) -> str:
    for b in BUCKETS:
        if n_tokens <= b:
            return f"<={b}"
    return f">{BUCKETS[-1]}"


def token_f1(a: Sequence[int], b: Sequence[int]) -> float:
    """F1 of the token multisets of two answers (1.0 when both are empty)."""
    if not a and not b:
        return 1.0
    common = sum((Counter(a) & Counter(b)).values())
    if common == 0:
        return 0.0
    p, r = common / len(a), common / len(b)
    return 2 * p * r / (p + r)


def wilson_lower(successes: int, n: int, z: float = 1.2816) -> float:
    """One-sided lower confidence bound (90 % at the default z) of a success rate."""
    if n == 0:
        return 0.0
    p = successes / n
    d = 1 + z * z / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - spread) / d


@dataclass
class AnswerJudge:
    """Greedy answers of ``tokens`` tokens from a prefill, compared by ``token_f1``.

    Decoding writes into each result's own buffer; the planner only judges builds made for the
    check (never the K/V a request is served from)."""

    engine: object
    tokens: int = 16
    agree_f1: float = 0.8

    def answer(self, res: FusionResult) -> list[int]:
        from ctxcache.engine.generate import stream_from_kv
        from ctxcache.engine.sampling import SamplingParams

        return [c.token_id for c in stream_from_kv(
            self.engine, res.kv, res.logits, SamplingParams(max_tokens=self.tokens),
            context_group=res.context_group, storage=res.storage) if c.token_id is not None]
