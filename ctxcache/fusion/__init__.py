"""KV reuse strategies behind one interface: full, prefix, naive, cacheblend, cachecraft, ape."""

from __future__ import annotations

from ctxcache.errors import InvalidInputError
from ctxcache.fusion.ape import APE
from ctxcache.fusion.base import FusionContext, FusionResult, FusionStats, FusionStrategy, Segment
from ctxcache.fusion.cacheblend import CacheBlend
from ctxcache.fusion.cachecraft import CacheCraft
from ctxcache.fusion.full import FullPrefill
from ctxcache.fusion.naive import NaiveReuse
from ctxcache.fusion.planner import Planner, first_token_kl
from ctxcache.fusion.prefix import PrefixReuse

STRATEGIES = {"full": FullPrefill, "prefix": PrefixReuse, "naive": NaiveReuse,
              "cacheblend": CacheBlend, "cachecraft": CacheCraft, "ape": APE}


def _kvcomm(**params) -> FusionStrategy:
    from ctxcache.agents.kvcomm import KVComm  # noqa: PLC0415 - agents build on fusion

    return KVComm(**params)


STRATEGIES["kvcomm"] = _kvcomm  # KVCOMM (ctxcache/agents/): shared segments across agents


def make_strategy(name: str, **params) -> FusionStrategy:
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise InvalidInputError(f"unknown strategy {name!r}; use one of {sorted(STRATEGIES)}") from None
    try:
        return cls(**params)
    except TypeError as e:
        raise InvalidInputError(f"bad parameters for {name}: {e}") from None


def default_strategies(**overrides: dict) -> dict[str, FusionStrategy]:
    return {n: make_strategy(n, **overrides.get(n, {})) for n in STRATEGIES}


__all__ = ["APE", "CacheBlend", "CacheCraft", "FullPrefill", "FusionContext", "FusionResult",
           "FusionStats", "FusionStrategy", "NaiveReuse", "Planner", "PrefixReuse", "STRATEGIES",
           "Segment", "default_strategies", "first_token_kl", "make_strategy"]
