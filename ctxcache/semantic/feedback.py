"""Outcome feedback for the semantic cache: what happens when a cached answer is checked.

Two uses of one comparison (a freshly generated answer vs the one the cache had):
* sampled verification of hits (``verify_rate``) — the false-hit estimate in the statistics;
* verified thresholds (``verified.py``) — the evidence from which a category's threshold is
  learned under a bound on wrong hits, including misses whose best candidate lay just below it.

A mixin of ``SemanticCache`` (like ``Maintenance``): it reads the cache's policies, verifier,
judge, payloads and statistics.
"""

from __future__ import annotations

import json

from ctxcache.semantic.types import LookupResult


class Feedback:
    def threshold_for(self, tenant: str, category: str) -> tuple[float, float, bool]:
        """(serve at or above, explore at or above, whether verified thresholds apply).

        Static policy: serve at the (load-adjusted) threshold, explore nothing. Verified: the
        learned threshold (above 1 while there is too little evidence) and the exploration
        floor below it."""
        policy = self.policies[category]
        static = self.load.threshold(policy)
        bound = self.verifier.max_error(tenant, category, policy.max_error_rate)
        if bound is None:
            return static, static, False
        return (*self.verifier.decide(tenant, category, static, bound), True)

    def should_verify(self) -> bool:
        return self.verify_rate > 0 and self._rng.random() < self.verify_rate

    def record_outcome(self, result: LookupResult, fresh: dict) -> bool | None:
        """Compare a freshly generated answer with what the cache had for this request.

        For a (sampled) verified hit: the hit's answer; for a miss with a candidate just below
        the threshold: that candidate's stored answer. Feeds the verified thresholds (and the
        false-hit estimate for hits). Returns whether they agreed, None when nothing to compare.
        """
        if result.hit is not None:
            entry_id, sim, stored = result.hit.entry_id, result.hit.similarity, \
                result.hit.response
            propensity = self.verify_rate if self.verify_rate > 0 else 1.0
        elif result.candidate is not None:
            entry_id, sim = result.candidate
            row = self._payload(entry_id)
            if row is None:
                return None
            stored, propensity = json.loads(row.response), 1.0
        else:
            return None
        same = self.judge.same(fresh, stored)
        self.verifier.observe(result.tenant, result.category, entry_id, sim, not same,
                              propensity)
        if result.hit is not None:
            self.record_verification(result.category, same)
        return same

    def record_verification(self, category: str, consistent: bool) -> None:
        """Outcome of re-answering a hit freshly (sampled): feeds the false-hit estimate."""
        with self._lock:
            st = self.stats[category]
            st.verified += 1
            st.false_hits += not consistent

    def verified_anywhere(self) -> bool:
        """Whether any category (or tenant override) has verified thresholds."""
        return any(p.max_error_rate is not None for p in self.policies.values()) or \
            self.verifier.has_overrides()

    def verified_stats(self) -> list[dict]:
        """Learned thresholds and their evidence, per (tenant, category) with a bound."""
        with self._lock:
            tenants = sorted(self.indexes)
        out = []
        for t in tenants:
            for c in self.categories:
                pol = self.policies[c]
                bound = self.verifier.max_error(t, c, pol.max_error_rate)
                if bound is None:
                    continue
                out.append({"tenant": t, "category": c, "static_threshold": pol.threshold,
                            **self.verifier.report(t, c, self.load.threshold(pol), bound)})
        return out

