"""Which strategy serves a request.

A configurable default, or ``auto``: the fastest strategy whose measured fidelity on recent
traffic stays above a threshold, else full prefill. Fidelity is measured by *shadow checks*: on a
sampled fraction of requests the planner also runs full prefill and compares. With an
``AnswerJudge`` (``judge.py``; the gateway uses one) the comparison is the one users see: short
greedy answers from both, agreement as token F1, tracked per strategy *and context-length
bucket*, and a strategy is proven where the lower confidence bound of its agreement rate passes
``min_agreement``. Without a judge it falls back to first-token top-1 agreement and KL. While a
cheaper strategy has too few samples, requests are served by full prefill and that strategy is
evaluated in the shadow, so ``auto`` never serves an unproven approximation.

Speed comes from a ``CostModel`` calibrated on this engine: ``auto`` picks the proven strategy
with the lowest predicted time for this prompt (counting chunks that still have to be built),
and full prefill whenever that is predicted faster — so the cache never makes a request slower.
The same guard applies to the configured default strategy (an explicit per-request strategy is
honoured as asked).

``long_context`` = (tokens, strategy) routes the default's prompts of at least that many tokens
to another strategy: on the GPU needle test CacheBlend keeps 100 % of full prefill's retrieval
at 4–16K but 85 % at 32K (it loses needles in the first chunk), while APE with its long-context
temperature keeps 95 % at 32K — so the gateway's default is CacheBlend below 24K tokens and APE
above (``benchmarks/longctx.py``; README, "Long context").
"""

from __future__ import annotations

import logging
import random
import threading
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from typing import Iterator, Sequence

import torch

from ctxcache.errors import InvalidInputError
from ctxcache.fusion.base import FusionContext, FusionResult, FusionStrategy, Segment
from ctxcache.fusion.costmodel import COLD, CostModel
from ctxcache.fusion.judge import AnswerJudge, bucket_of, token_f1, wilson_lower
from ctxcache.kv.keys import chunk_key

log = logging.getLogger("ctxcache.planner")

# cheapest first (typical compute share of full prefill)
AUTO_ORDER = ("naive", "ape", "kvcomm", "cacheblend", "cachecraft", "prefix")


def first_token_kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """KL(full ‖ strategy) of the next-token distributions."""
    p = torch.log_softmax(ref_logits.float().reshape(-1), -1)
    q = torch.log_softmax(logits.float().reshape(-1), -1)
    return float(torch.sum(p.exp() * (p - q)))


@dataclass
class FidelityTracker:
    window: int = 50
    samples: dict[str, deque] = field(default_factory=dict)
    answers: dict[tuple[str, str], deque] = field(default_factory=dict)

    def record(self, strategy: str, kl: float, top1: bool) -> None:
        self.samples.setdefault(strategy, deque(maxlen=self.window)).append((kl, top1))

    def record_answer(self, strategy: str, bucket: str, f1: float) -> None:
        self.answers.setdefault((strategy, bucket), deque(maxlen=4 * self.window)).append(f1)

    def summary(self, strategy: str) -> dict:
        s = self.samples.get(strategy) or ()
        if not s:
            return {"n": 0, "top1": None, "kl": None}
        return {"n": len(s), "top1": sum(t for _, t in s) / len(s),
                "kl": sum(k for k, _ in s) / len(s)}

    def answer_summary(self, strategy: str, bucket: str, agree_f1: float) -> dict:
        s = self.answers.get((strategy, bucket)) or ()
        agree = sum(f >= agree_f1 for f in s)
        return {"n": len(s), "mean_f1": sum(s) / len(s) if s else None,
                "agreement": agree / len(s) if s else None,
                "agreement_lower_bound": wilson_lower(agree, len(s))}


class Planner:
    def __init__(self, strategies: dict[str, FusionStrategy], default: str = "cacheblend",
                 min_top1: float = 0.9, min_samples: int = 10, sample_rate: float = 0.05,
                 seed: int | None = None, cost_model: CostModel | None = None,
                 judge: AnswerJudge | None = None, min_agreement: float = 0.85,
                 long_context: tuple[int, str] | None = None, defer_checks: bool = False):
        if default != "auto" and default not in strategies:
            raise InvalidInputError(f"unknown default strategy {default!r}")
        if long_context is not None and (long_context[1] not in strategies or
                                         long_context[0] < 0):
            raise InvalidInputError(f"long_context needs (tokens >= 0, a strategy of "
                                    f"{sorted(strategies)}), not {long_context!r}")
        if "full" not in strategies:
            raise InvalidInputError("the planner needs the 'full' strategy as its fallback")
        self.strategies = strategies
        self.default = default
        self.long_context = long_context
        # answer checks (shadow full prefill + the strategy, both decoded) run after the
        # request instead of inside it: ``run_deferred`` when the server is idle, a bounded
        # queue that drops the oldest under sustained load (fewer checks, never a slower
        # request)
        self.defer_checks = defer_checks
        self.deferred: deque = deque(maxlen=16)
        self._check: Iterator[None] | None = None  # the deferred check under way, as steps
        self.dropped_checks = 0
        self.min_top1 = min_top1
        self.min_samples = min_samples
        self.sample_rate = sample_rate
        self.tracker = FidelityTracker()
        self.cost_model = cost_model
        self.judge = judge
        self.min_agreement = min_agreement
        self.served: Counter = Counter()
        self.served_by_bucket: Counter = Counter()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def _qualified(self, name: str, bucket: str | None = None) -> bool:
        if self.judge is not None:
            a = self.tracker.answer_summary(name, bucket or "", self.judge.agree_f1)
            return a["n"] >= self.min_samples and \
                a["agreement_lower_bound"] >= self.min_agreement
        s = self.tracker.summary(name)
        return s["n"] >= self.min_samples and s["top1"] >= self.min_top1

    def _samples(self, name: str, bucket: str | None) -> int:
        if self.judge is not None:
            return len(self.tracker.answers.get((name, bucket or ""), ()))
        return self.tracker.summary(name)["n"]

    def _cheaper(self, name: str, sizes: tuple[int, int], cold: frozenset) -> bool:
        """Predicted faster than full prefill on this prompt; a strategy in its slower first-use
        mode is priced by its cold calibration, and never served if that was not measured."""
        cm = self.cost_model
        if name in cold:
            cold_name = COLD[name]
            if cm.predict(cold_name, *sizes) is None:
                return False
            name = cold_name
        return cm.cheaper_than_full(name, *sizes)

    def choose(self, requested: str | None = None, sizes: tuple[int, int] | None = None,
               cold: frozenset = frozenset(), route: bool = True) -> tuple[str, str | None]:
        """(strategy to serve with, strategy to evaluate in the shadow or None).

        ``sizes`` = (prompt tokens, tokens of chunks not cached yet) lets the cost model veto
        reuse that would be slower than full prefill (``auto`` and the configured default);
        ``cold`` names strategies that would run their slower first-use mode on this prompt;
        ``route`` False keeps the default off its long-context route (a request that sets the
        default's recompute ratio is served by that strategy, so the ratio is honoured)."""
        name = requested or self.default
        if route and requested is None and name != "auto" and self.long_context is not None and \
                sizes is not None and sizes[0] >= self.long_context[0]:
            name = self.long_context[1]
        cm = self.cost_model if sizes is not None else None
        if name != "auto":
            if name not in self.strategies:
                raise InvalidInputError(
                    f"unknown strategy {name!r}; use one of {sorted(self.strategies)} or 'auto'")
            if cm is not None and requested is None and name != "full" and \
                    not self._cheaper(name, sizes, cold):
                return "full", None
            exact = self.strategies[name].exact
            return name, name if not exact and self._rng.random() < self.sample_rate else None
        cands = [n for n in AUTO_ORDER if n in self.strategies]
        bucket = bucket_of(sizes[0]) if sizes is not None else None
        proven = [n for n in cands if self._qualified(n, bucket)]
        if cm is not None:
            proven = [n for n in proven if self._cheaper(n, sizes, cold)]
            proven.sort(key=lambda n: cm.predict(COLD[n] if n in cold else n, *sizes) or 0.0)
        if proven:
            n = proven[0]
            return n, n if self._rng.random() < self.sample_rate else None
        if self.judge is not None and sizes is not None:
            unproven = self._proving(bucket, sizes)
        else:
            unproven = [n for n in cands if self._samples(n, bucket) < self.min_samples]
        # every unproven strategy gets evaluated in turn (random, so none starves)
        return "full", (self._rng.choice(unproven) if unproven else None)

    @staticmethod
    def chunk_keys(ctx: FusionContext, segments: Sequence[Segment]) -> list[str]:
        """Each chunk segment's own content key (no prefix), hashed once per request."""
        fp = ctx.engine.fingerprint
        return [chunk_key(fp, s.token_ids) for s in segments
                if s.role == "chunk" and s.token_ids]

    def _cold(self, keys: list[str]) -> frozenset:
        """Strategies that would run their first-use mode on this prompt (host checks)."""
        return frozenset(name for name, st in self.strategies.items()
                         if hasattr(st, "is_cold") and st.is_cold(keys))

    @staticmethod
    def sizes(ctx: FusionContext, segments: Sequence[Segment],
              keys: list[str] | None = None) -> tuple[int, int]:
        """(prompt tokens, tokens of chunks with no cache yet) — host lookups only. ``keys``:
        the chunks' ``chunk_keys``, when the caller has them already."""
        fp = ctx.engine.fingerprint
        prefix = [t for s in segments if s.role == "prefix" for t in (s.token_ids or [])]
        pkey = chunk_key(fp, prefix) if prefix else None
        own = iter(keys if keys is not None else Planner.chunk_keys(ctx, segments))
        n = missing = 0
        for s in segments:
            k = len(s.token_ids or [])
            n += k
            if s.role == "chunk" and s.token_ids:
                plain = next(own)
                if not (pkey and ctx.store.contains(chunk_key(fp, s.token_ids, pkey),
                                                    ctx.namespace)) and \
                        not ctx.store.contains(plain, ctx.namespace):
                    missing += k
        return n, missing

    def run(self, ctx: FusionContext, segments: Sequence[Segment],
            requested: str | None = None, recompute_ratio: float | None = None
            ) -> FusionResult:
        """Build with the chosen strategy; ``recompute_ratio`` overrides the ratio of a
        strategy that has one (full prefill, if chosen, recomputes everything anyway)."""
        keys = self.chunk_keys(ctx, segments) if (self.cost_model is not None or
                                                   self.judge is not None or
                                                   self.long_context is not None) else None
        sizes = self.sizes(ctx, segments, keys) if keys is not None else None
        # the cold check matters only where the planner picks (a named strategy is served)
        cold = self._cold(keys) if self.cost_model is not None and \
            requested in (None, "auto") else frozenset()
        name, shadow = self.choose(requested, sizes, cold, route=recompute_ratio is None)
        strategy = self.strategies[name]
        if recompute_ratio is not None and strategy.ratio_attr is not None:
            strategy = strategy.with_ratio(recompute_ratio)
        result = strategy.build(ctx, segments)
        if shadow is not None:
            if self.judge is not None:
                bucket = bucket_of(sizes[0])
                # while proving (auto serving full), every candidate still unproven here is
                # judged against the one reference: proving takes min_samples requests, not
                # min_samples × strategies
                shadows = [shadow] if name != "full" or requested is not None or \
                    self.default != "auto" else self._proving(bucket, sizes) or [shadow]
                if self.defer_checks:
                    with self._lock:
                        if len(self.deferred) == self.deferred.maxlen:
                            self.dropped_checks += 1
                        # without the resident rows: a queued check must not pin their memory
                        self.deferred.append((replace(ctx, resident=None), list(segments),
                                              shadows, bucket))
                else:
                    self._judge(ctx, segments, shadows, bucket)
            else:
                ref = result if name == "full" else self.strategies["full"].build(ctx, segments)
                test = result if shadow == name else self.strategies[shadow].build(ctx, segments)
                with self._lock:
                    self.tracker.record(shadow, first_token_kl(ref.logits, test.logits),
                                        bool(ref.logits.argmax() == test.logits.argmax()))
        result.stats.extra["planner"] = {"requested": requested or self.default, "served": name,
                                         "shadow": shadow}
        with self._lock:
            self.served[name] += 1
            if sizes is not None:
                self.served_by_bucket[(name, bucket_of(sizes[0]))] += 1
        return result

    def run_deferred(self) -> bool:
        """Run one step of the deferred answer checks (a build, or one answer's greedy decode);
        False when none is waiting. The serving engine calls this while it has nothing else to
        do, and looks at its queue again after every step, so a request that arrives during a
        check waits for one step of it, not for the whole check (a full prefill and an answer
        per candidate: at 32K tokens several times a request's own time to first token)."""
        with self._lock:
            if self._check is None:
                if not self.deferred:
                    return False
                ctx, segments, shadows, bucket = self.deferred.popleft()
                self._check = self._judge_steps(ctx, segments, shadows, bucket)
            check = self._check
        try:
            next(check)
        except StopIteration:
            with self._lock:
                self._check = None
        except Exception:  # noqa: BLE001 - a failed check must not stop serving
            log.exception("deferred answer check failed")
            with self._lock:
                self._check = None
        return True

    def drain(self) -> int:
        """Run every deferred check to its end now (benchmarks, between timed requests);
        the number of steps run."""
        n = 0
        while self.run_deferred():
            n += 1
        return n

    def _disproven(self, name: str, bucket: str) -> bool:
        """Its agreement rate's upper confidence bound is already below the threshold."""
        a = self.tracker.answer_summary(name, bucket, self.judge.agree_f1)
        n = a["n"]  # half the proving samples at least: two unlucky checks drop nothing
        return n >= max(1, self.min_samples // 2) and \
            1.0 - wilson_lower(n - round(a["agreement"] * n), n) < self.min_agreement

    def _proving(self, bucket: str, sizes: tuple[int, int]) -> list[str]:
        """Strategies still worth judging in this bucket: neither proven nor disproven yet,
        with room left in the tracker's window, and (with a cost model) able to be faster
        than full prefill on this prompt once warm (a shadow build is also how a cold strategy
        warms up). Judging goes on past ``min_samples`` until the confidence bound decides:
        a strategy at 9 of 10 is neither proven nor disproven, and stopping there left it
        unproven for good (auto then served full prefill forever)."""
        cm = self.cost_model
        cap = 4 * self.tracker.window  # the answers kept per (strategy, bucket)
        return [n for n in AUTO_ORDER if n in self.strategies
                and self._samples(n, bucket) < cap
                and not self._qualified(n, bucket)
                and not self._disproven(n, bucket)
                and (cm is None or self._cheaper(n, sizes, frozenset()))]

    def _judge(self, ctx: FusionContext, segments: Sequence[Segment], shadows: list[str],
               bucket: str) -> None:
        """Answer agreement of each of ``shadows`` with full prefill on this prompt, at once."""
        for _ in self._judge_steps(ctx, segments, shadows, bucket):
            pass

    def _judge_steps(self, ctx: FusionContext, segments: Sequence[Segment],
                     shadows: list[str], bucket: str) -> Iterator[None]:
        """The check as steps (yields after each build and each answer). All are built
        afresh for the check, so decoding the judge's answers never touches the K/V the
        request is served from; the reference answer is decoded once."""
        ref = self.strategies["full"].build(ctx, segments)
        yield
        ref_answer = self.judge.answer(ref)
        for shadow in shadows:
            yield
            test = self.strategies[shadow].build(ctx, segments)
            yield
            f1 = token_f1(self.judge.answer(test), ref_answer)
            with self._lock:
                self.tracker.record(shadow, first_token_kl(ref.logits, test.logits),
                                    bool(ref.logits.argmax() == test.logits.argmax()))
                self.tracker.record_answer(shadow, bucket, f1)

    def report(self) -> dict:
        return {n: self.tracker.summary(n) for n in self.strategies if n != "full"}

    def answer_report(self) -> dict:
        """Answer agreement per strategy and length bucket (judged planners)."""
        if self.judge is None:
            return {}
        return {f"{n} {b}": self.tracker.answer_summary(n, b, self.judge.agree_f1)
                for (n, b) in sorted(self.tracker.answers)}

    def describe(self) -> dict:
        """Fidelity per strategy, how often each served, and the cost model in use."""
        out = {"default": self.default, "long_context": self.long_context,
               "deferred_checks": len(self.deferred), "dropped_checks": self.dropped_checks,
               "fidelity": self.report(), "served": dict(self.served)}
        if self.judge is not None:
            out["answer_agreement"] = self.answer_report()
            out["served_by_bucket"] = {f"{n} {b}": c for (n, b), c in
                                       sorted(self.served_by_bucket.items())}
        if self.cost_model is not None:
            out["cost_model"] = {"coeffs": self.cost_model.coeffs, "key": self.cost_model.key}
        return out


def serving_planner(engine, default: str = "cacheblend", recompute_ratio: float = 0.15,
                    cost_model: bool = True, judge: bool = True, background: bool = False,
                    cacheblend: dict | None = None,
                    long_context: tuple[int, str] | None = (24000, "ape"),
                    **options) -> Planner:
    """The planner as the gateway builds it: the default strategy (or ``auto``) over every
    strategy, guarded by the cost model calibrated on this engine (first uses included), and
    judged by answer agreement. Benchmarks use it for their ``default`` row, so the row is
    what users are served. ``background`` calibrates in a thread (serving starts at once and
    is guarded once the model is ready). ``cacheblend``: further CacheBlend options (e.g. its
    question focus); ``long_context``: the default's route for long prompts (None: off;
    ignored under ``auto``, which proves strategies per length bucket instead). Answer checks
    are deferred to idle time (``run_deferred``), so no request waits for one."""
    from ctxcache.fusion import default_strategies
    from ctxcache.fusion.costmodel import load_or_calibrate

    planner = Planner(default_strategies(cacheblend={"recompute_ratio": recompute_ratio,
                                                     **(cacheblend or {})}),
                      default=default, judge=AnswerJudge(engine) if judge else None,
                      long_context=long_context if default != "auto" else None,
                      defer_checks=True, **options)
    if cost_model:
        def calibrate() -> None:
            try:
                planner.cost_model = load_or_calibrate(engine, planner.strategies)
            except Exception:  # noqa: BLE001 - without a cost model the planner still works
                log.exception("cost model calibration failed; reuse runs unguarded")

        if background:
            threading.Thread(target=calibrate, name="cost-model", daemon=True).start()
        else:
            calibrate()
    return planner
