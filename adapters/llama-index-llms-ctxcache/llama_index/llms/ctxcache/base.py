"""``CtxCache``: the ctxcache gateway as a LlamaIndex LLM.

The gateway speaks OpenAI's chat-completions protocol, so this is ``OpenAILike`` with the
gateway's defaults (``CTXCACHE_BASE_URL``, ``CTXCACHE_API_KEY``, chat model) and ctxcache's
request extras as fields or per call — ``llm.chat(messages, passages=[...])``:

* ``semantic_cache``: look up / store the answer in the gateway's semantic cache;
* ``category``: force the semantic-cache category;
* ``document_ids`` / ``passages``: answer from ingested documents / given passages whose chunk
  K/V the gateway reuses (see ``CtxCacheSynthesizer`` for query engines);
* ``strategy``: the reuse strategy (``cacheblend``, ``auto``, ``full`` …).

What the gateway did is in ``response.raw.model_extra["ctxcache"]`` (``ctxcache_meta``).

``metadata.is_function_calling_model`` is what the gateway reports for its model (tool
calling needs a chat template with a tool format, e.g. Qwen2.5's), so ``FunctionAgent`` and
``llm.chat_with_tools`` work where the model can call tools and are refused where it cannot.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import httpx
from llama_index.core.bridge.pydantic import Field
from llama_index.llms.openai_like import OpenAILike

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
EXTRAS = ("semantic_cache", "category", "document_ids", "passages", "strategy")


def ctxcache_meta(response: Any) -> Optional[dict]:
    """The gateway's ``ctxcache`` report from a LlamaIndex chat/completion response."""
    raw = getattr(response, "raw", None)
    if raw is None:
        return None
    if isinstance(raw, dict):
        return raw.get("ctxcache")
    return (getattr(raw, "model_extra", None) or {}).get("ctxcache")


def gateway_can_call_tools(api_base: str, api_key: str, model: str,
                           timeout_s: float = 5.0) -> bool:
    """Whether the gateway's model does tool calling (``/v1/models`` reports its
    capabilities); False when the gateway cannot be asked — agents then refuse this LLM
    up front instead of failing on their first tool call."""
    try:
        r = httpx.get(api_base + "/models", headers={"Authorization": f"Bearer {api_key}"},
                      timeout=timeout_s)
        r.raise_for_status()
        data = r.json().get("data") or []
    except (httpx.HTTPError, ValueError):
        return False
    entry = next((m for m in data if m.get("id") == model), data[0] if data else {})
    return bool((entry.get("capabilities") or {}).get("tool_calling"))


class CtxCache(OpenAILike):
    """LLM served by a ctxcache gateway (``ctxcache serve``).

    .. code-block:: python

        from llama_index.llms.ctxcache import CtxCache

        llm = CtxCache(max_tokens=64)          # CTXCACHE_BASE_URL or http://127.0.0.1:8000/v1
        print(llm.complete("What is the capital of France?"))
    """

    semantic_cache: bool = Field(default=True, description="use the gateway's semantic cache")
    category: Optional[str] = Field(default=None, description="semantic-cache category")
    document_ids: Optional[list[str]] = Field(default=None, description="ingested documents")
    passages: Optional[list[str]] = Field(default=None, description="passages to answer from")
    strategy: Optional[str] = Field(default=None, description="KV reuse strategy")

    def __init__(self, model: str = "default", api_base: Optional[str] = None,
                 api_key: Optional[str] = None, is_chat_model: bool = True,
                 context_window: int = 8192,
                 is_function_calling_model: Optional[bool] = None, **kwargs: Any) -> None:
        base = (api_base or os.environ.get("CTXCACHE_BASE_URL") or os.environ.get("CTXCACHE_URL")
                or DEFAULT_BASE_URL).rstrip("/")
        base = base if base.endswith("/v1") else base + "/v1"
        key = api_key or os.environ.get("CTXCACHE_API_KEY", "none")
        if is_function_calling_model is None:  # asked of the gateway: what its model can do
            is_function_calling_model = gateway_can_call_tools(base, key, model)
        super().__init__(
            model=model, api_base=base, api_key=key, is_chat_model=is_chat_model,
            context_window=context_window,
            is_function_calling_model=is_function_calling_model, **kwargs)

    @classmethod
    def class_name(cls) -> str:
        return "CtxCache"

    def _get_model_kwargs(self, **kwargs: Any) -> dict[str, Any]:
        extras: dict[str, Any] = {}
        for name in EXTRAS:
            value = kwargs.pop(name, getattr(self, name))
            if value is None or (isinstance(value, list) and not value):
                continue
            extras["cache" if name == "semantic_cache" else name] = value
        out = super()._get_model_kwargs(**kwargs)
        if extras:
            out["extra_body"] = {**(out.get("extra_body") or {}), **extras}
        return out
