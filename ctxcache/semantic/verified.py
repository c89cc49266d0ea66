"""Verified thresholds: similarity thresholds learned online under a user-set error bound.

Why: a static threshold is a guess about the embedder, the category and the traffic. Too strict
and paraphrases miss; too loose and near-misses ("... in Python" vs "... in Go") are served the
wrong answer. vCache's answer is to learn the threshold from checked outcomes and to bound the
error rate, not the similarity. Here, per (tenant, category):

* Evidence is pairs (similarity of the nearest entry, was its stored answer right for this
  request?). Two sources:
  - explored misses — a request whose best candidate lies below the threshold but within
    ``explore_margin`` goes to the backend anyway; its fresh answer is compared with the
    candidate's stored one. Free: no extra generation.
  - verified hits — a sampled fraction (``verify_rate``) of hits is also answered by the
    backend and compared. Costs one generation each.
  Hits are seen with probability ``verify_rate`` and explored misses always, so every
  observation is weighted by 1 / that probability (inverse propensity): the weighted error
  rate above ``t`` estimates the error rate of *all* hits served at ``t``.
* The learned threshold is the lowest ``t`` (on a 0.005 grid) where the one-sided upper
  confidence bound (Wilson, z = 1.645, effective sample size of the weights) of that error rate
  is within ``max_error_rate``, scanning down from 1 and stopping where the bound first fails
  below a passing level (errors start there). It moves both ways as evidence arrives; where no
  level passes (too little evidence, or errors up to the top) nothing is served.
* Cold start: until that bound holds somewhere, nothing in the category is served; every
  candidate above ``static - explore_margin`` is explored (the user gets the backend's answer,
  which is compared with the candidate's). So the bound is never traded for early hits: a
  category starts paying off after roughly ``z² (1 - d) / d`` agreeing comparisons (52 at a 5 %
  bound), and one whose near-misses look like its paraphrases never does.
* Per entry: an entry shown wrong for a request at similarity ``s`` is not served at ``<= s``
  again — the one bad neighbour that a category-wide threshold cannot see.

Approximations (stated, not hidden): the bound is per threshold, not simultaneous over the grid
(choosing the lowest passing ``t`` is mildly optimistic; requiring every higher ``t`` to pass
limits that); answers are judged equal by a pluggable judge (default: the cache's embedder,
cosine >= 0.9 of the two answer texts), so the bound holds for what the judge calls an error;
evidence lives in memory per replica (a restart or a new replica starts exploring again,
which is the safe side).
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from ctxcache.errors import InvalidInputError

Z_95 = 1.645  # one-sided 95 %
NO_SERVE = 2.0  # a threshold no cosine similarity reaches


def wilson_upper(errors: float, n: float, z: float = Z_95) -> float:
    """Upper confidence bound of a rate from ``errors`` out of ``n`` (may be fractional)."""
    if n <= 0:
        return 1.0
    p = errors / n
    den = 1 + z * z / n
    centre = p + z * z / (2 * n)
    rad = z * math.sqrt(max(p * (1 - p) / n + z * z / (4 * n * n), 0.0))
    return min(1.0, (centre + rad) / den)


class AnswerJudge(Protocol):
    def same(self, fresh: dict, stored: dict) -> bool:
        """Would ``stored`` have been an acceptable answer where ``fresh`` was generated?"""


def _answer_text(answer: dict) -> str:
    """A generated answer's text, or a client-cache entry's value as canonical JSON."""
    if "text" in answer:
        return str(answer["text"]).strip()
    return json.dumps(answer.get("value"), sort_keys=True, default=str)


class EmbeddingJudge:
    """Answers agree when their texts embed close (exact repeats short-circuit)."""

    def __init__(self, embed: Callable[[list[str]], np.ndarray], min_similarity: float = 0.9):
        self.embed, self.min_similarity = embed, min_similarity

    def same(self, fresh: dict, stored: dict) -> bool:
        a, b = _answer_text(fresh), _answer_text(stored)
        if a == b:
            return True
        if not a or not b:
            return False
        va, vb = self.embed([a, b])
        return float(va @ vb) >= self.min_similarity


@dataclass
class Evidence:
    sims: deque
    wrong: deque
    weights: deque
    learned: float | None = None  # None: too little evidence to bound the error (not served)
    dirty: bool = False
    pending: int = 0  # observations since the last learning
    learned_at: float = 0.0
    learned_for: float | None = None  # the bound it was learned for


class VerifiedThresholds:
    """Evidence and learned thresholds for every (tenant, category) that has an error bound."""

    def __init__(self, *, min_observations: float = 30.0, explore_margin: float = 0.08,
                 grid_step: float = 0.005, capacity: int = 20_000, z: float = Z_95):
        if not 0 < explore_margin < 1:
            raise InvalidInputError("explore_margin must be in (0, 1)")
        self.min_observations, self.explore_margin = min_observations, explore_margin
        self.grid_step, self.capacity, self.z = grid_step, capacity, z
        self._ev: dict[tuple[str, str], Evidence] = {}
        self._guard: dict[int, float] = {}
        self._bounds: dict[tuple[str, str], float] = {}  # tenant overrides
        self._lock = threading.Lock()

    # ----------------------------------------------------------------- configuration
    def set_max_error(self, tenant: str, category: str, rate: float | None) -> None:
        """A tenant's own bound for one category (None: back to the category policy's)."""
        if rate is not None and not 0 < rate < 1:
            raise InvalidInputError("max_error_rate must be in (0, 1)")
        with self._lock:
            if rate is None:
                self._bounds.pop((tenant, category), None)
            else:
                self._bounds[(tenant, category)] = rate

    def has_overrides(self) -> bool:
        return bool(self._bounds)

    def max_error(self, tenant: str, category: str, policy_bound: float | None) -> float | None:
        return self._bounds.get((tenant, category), policy_bound)

    # ----------------------------------------------------------------- decisions
    def learned(self, tenant: str, category: str, bound: float) -> float | None:
        """The learned threshold, or None while the evidence is too thin to bound the error."""
        with self._lock:
            ev = self._ev.get((tenant, category))
            if ev is None:
                return None
            # re-learn once the evidence grew by 5 % or a second passed: O(grid · log n) work
            # that would otherwise fall on every lookup under steady exploration
            # a new bound (policy edited, tenant override) applies at once
            if ev.learned_for != bound or ev.dirty and (
                    ev.pending * 20 >= len(ev.sims) or time.monotonic() - ev.learned_at >= 1.0):
                ev.learned = self._learn(ev, bound)
                ev.dirty, ev.pending, ev.learned_at = False, 0, time.monotonic()
                ev.learned_for = bound
            return ev.learned

    def decide(self, tenant: str, category: str, static: float, bound: float
               ) -> tuple[float, float]:
        """(serve at or above, explore at or above). Until the evidence bounds the error, nothing
        is served: candidates above the floor are explored — answered by the backend (the user
        gets a fresh answer, never an unverified one) and compared. The floor follows the
        learned threshold down, so evidence can reach lower similarities over time."""
        learned = self.learned(tenant, category, bound)
        serve = NO_SERVE if learned is None else learned
        return serve, max(0.0, min(static, serve) - self.explore_margin)

    def guard(self, entry_id: int) -> float:
        """The entry is not served at similarities at or below this (-1: no evidence)."""
        return self._guard.get(entry_id, -1.0)

    # ----------------------------------------------------------------- evidence
    def observe(self, tenant: str, category: str, entry_id: int, similarity: float,
                wrong: bool, propensity: float = 1.0) -> None:
        if not 0 < propensity <= 1:
            raise InvalidInputError("propensity must be in (0, 1]")
        with self._lock:
            ev = self._ev.get((tenant, category))
            if ev is None:
                ev = self._ev[(tenant, category)] = Evidence(
                    deque(maxlen=self.capacity), deque(maxlen=self.capacity),
                    deque(maxlen=self.capacity))
            ev.sims.append(float(similarity))
            ev.wrong.append(bool(wrong))
            ev.weights.append(1.0 / propensity)
            ev.dirty = True
            ev.pending += 1
            if wrong:
                self._guard[entry_id] = max(self._guard.get(entry_id, -1.0), float(similarity))

    def forget_entry(self, entry_id: int) -> None:
        self._guard.pop(entry_id, None)

    def _learn(self, ev: Evidence, bound: float) -> float | None:
        if not ev.sims:
            return None
        s = np.asarray(ev.sims)
        w = np.asarray(ev.weights)
        e = np.asarray(ev.wrong, dtype=np.float64)
        order = np.argsort(-s)
        s, w, e = s[order], w[order], e[order]
        cw, cw2, ce = np.cumsum(w), np.cumsum(w * w), np.cumsum(w * e)
        learned = None
        for t in np.arange(1.0, s[-1] - self.grid_step, -self.grid_step):
            k = int(np.searchsorted(-s, -t, side="right"))  # observations with sim >= t
            if k == 0:
                continue
            n_eff = cw[k - 1] ** 2 / cw2[k - 1]
            if n_eff < self.min_observations:
                continue
            if wilson_upper(ce[k - 1] / cw[k - 1] * n_eff, n_eff, self.z) > bound:
                if learned is not None:
                    break  # errors start here: do not reach below them
                continue  # too few agreeing observations yet, or errors at the top
            learned = float(t)
        return learned

    def report(self, tenant: str, category: str, static: float, bound: float | None) -> dict:
        """Learned threshold and the evidence behind it (for /v1/cache/stats and benchmarks)."""
        thr = self.decide(tenant, category, static, bound)[0] if bound else static
        with self._lock:
            ev = self._ev.get((tenant, category))
            if ev is None or not ev.sims:
                return {"threshold": thr if thr < NO_SERVE else None, "learned": False,
                        "observations": 0, "max_error_rate": bound}
            s, w = np.asarray(ev.sims), np.asarray(ev.weights)
            e = np.asarray(ev.wrong, dtype=np.float64)
        above = s >= thr
        n_eff = float(w[above].sum() ** 2 / max((w[above] ** 2).sum(), 1e-12)) if above.any() else 0
        rate = float((w[above] * e[above]).sum() / w[above].sum()) if above.any() else None
        return {"threshold": thr if thr < NO_SERVE else None,
                "learned": ev.learned is not None, "observations": len(s),
                "max_error_rate": bound, "error_rate_estimate": rate,
                "error_rate_upper_95": wilson_upper(rate * n_eff, n_eff, self.z)
                if rate is not None else None, "effective_n": n_eff}
