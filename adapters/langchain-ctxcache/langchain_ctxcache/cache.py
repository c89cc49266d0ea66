"""``CtxCacheSemanticCache``: LangChain's LLM cache (``BaseCache``) backed by the gateway's
category-aware semantic cache.

LangChain calls ``lookup(prompt, llm_string)`` before a model call and ``update`` after it.
For chat models ``prompt`` is the serialised message list: the cache keys on the text of the
last human message (what paraphrases share) and puts everything else — the earlier messages
and ``llm_string`` (model and parameters) — into the entry's *scope*, so a hit needs a close
question **and** an identical context. Thresholds, TTLs and quotas are the gateway's
per-category policies; entries are per tenant (API key).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Sequence

from ctxcache_client import AsyncClient, Client
from langchain_core.caches import RETURN_VAL_TYPE, BaseCache
from langchain_core.load import dumpd, load

SCOPE_PREFIX = "langchain|"


def split_prompt(prompt: str, llm_string: str) -> tuple[str, str]:
    """(text to match semantically, exact scope)."""
    text, context = prompt, ""
    try:
        messages = json.loads(prompt)
    except ValueError:
        messages = None
    if isinstance(messages, list) and messages:
        human = [i for i, m in enumerate(messages) if _kind(m) == "human"]
        if human and isinstance(_content(messages[human[-1]]), str):
            i = human[-1]
            text = _content(messages[i])
            context = json.dumps(messages[:i] + messages[i + 1:], sort_keys=True)
    digest = hashlib.sha256((llm_string + "\x00" + context).encode()).hexdigest()
    return text, SCOPE_PREFIX + digest


def _kind(m: Any) -> str | None:
    if isinstance(m, dict):  # dumpd form: {"id": [..., "HumanMessage"], "kwargs": {...}}
        ident = m.get("id") or []
        name = ident[-1] if ident else m.get("type", "")
        return "human" if name in ("HumanMessage", "human") else name
    return None


def _content(m: dict) -> Any:
    return (m.get("kwargs") or m).get("content")


class CtxCacheSemanticCache(BaseCache):
    """``set_llm_cache(CtxCacheSemanticCache())`` — every LangChain model call then consults
    the gateway's semantic cache first (whatever model answers; the gateway only stores)."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None,
                 category: str | None = None, timeout: float = 30.0):
        self.client = Client(base_url, api_key, timeout)
        self.aclient = AsyncClient(base_url, api_key, timeout)
        self.category = category
        self._scopes: set[str] = set()

    # ---------------------------------------------------------------- sync
    def lookup(self, prompt: str, llm_string: str) -> RETURN_VAL_TYPE | None:
        text, scope = split_prompt(prompt, llm_string)
        return _decode(self.client.cache_lookup(text, scope, self.category))

    def update(self, prompt: str, llm_string: str, return_val: RETURN_VAL_TYPE) -> None:
        text, scope = split_prompt(prompt, llm_string)
        self._scopes.add(scope)
        self.client.cache_put(text, [dumpd(g) for g in return_val], scope, self.category)

    def clear(self, **kwargs: Any) -> None:
        """Drop the entries this cache object wrote (by scope); ``scopes=`` names others."""
        for scope in _scopes(kwargs, self._scopes):
            self.client.cache_clear(scope)
        self._scopes.clear()

    # ---------------------------------------------------------------- async
    async def alookup(self, prompt: str, llm_string: str) -> RETURN_VAL_TYPE | None:
        text, scope = split_prompt(prompt, llm_string)
        return _decode(await self.aclient.cache_lookup(text, scope, self.category))

    async def aupdate(self, prompt: str, llm_string: str,
                      return_val: RETURN_VAL_TYPE) -> None:
        text, scope = split_prompt(prompt, llm_string)
        self._scopes.add(scope)
        await self.aclient.cache_put(text, [dumpd(g) for g in return_val], scope,
                                     self.category)

    async def aclear(self, **kwargs: Any) -> None:
        for scope in _scopes(kwargs, self._scopes):
            await self.aclient.cache_clear(scope)
        self._scopes.clear()


def _scopes(kwargs: dict, own: set[str]) -> Sequence[str]:
    return list(kwargs.get("scopes") or own)


def _decode(res: dict) -> RETURN_VAL_TYPE | None:
    if not res.get("hit") or not isinstance(res.get("value"), list):
        return None
    try:
        return [load(g, allowed_objects="core") for g in res["value"]]
    except Exception:  # noqa: BLE001 - an unreadable entry is a miss, never an error
        return None
