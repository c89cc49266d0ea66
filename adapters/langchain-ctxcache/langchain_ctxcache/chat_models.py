"""``ChatCtxCache``: LangChain's chat model for a ctxcache gateway.

The gateway speaks the OpenAI chat-completions protocol, so this builds on ``langchain-openai``'s
``BaseChatOpenAI`` (streaming, async, usage, batching come from there) and adds ctxcache's
request extras as model fields — or per call, e.g. ``llm.invoke(q, document_ids=[...])`` or
``llm.bind(strategy="cacheblend")``:

* ``semantic_cache`` (bool): look up / store the answer in the semantic cache;
* ``category``: force the semantic-cache category (otherwise the gateway's classifier decides);
* ``document_ids`` / ``passages``: answer from ingested documents or given passages, whose
  chunk K/V the gateway reuses instead of prefilling them again;
* ``strategy``: the reuse strategy for those (``cacheblend``, ``auto``, ``full`` …).

What the gateway did (semantic hit or miss, strategy, tokens reused) is in
``response_metadata["ctxcache"]``.
"""

from __future__ import annotations

from typing import Any

import openai
from langchain_core.language_models import LanguageModelInput
from langchain_core.outputs import ChatResult
from langchain_core.utils import from_env, secret_from_env
from langchain_openai.chat_models.base import BaseChatOpenAI
from pydantic import Field, SecretStr, field_validator

EXTRAS = ("semantic_cache", "category", "document_ids", "passages", "strategy")
DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"


class ChatCtxCache(BaseChatOpenAI):
    """Chat model served by a ctxcache gateway.

    Setup: ``pip install langchain-ctxcache`` and a running gateway (``ctxcache serve``);
    ``CTXCACHE_BASE_URL`` (default ``http://127.0.0.1:8000/v1``) and ``CTXCACHE_API_KEY``
    (only when the gateway requires keys) are read from the environment.

    .. code-block:: python

        from langchain_ctxcache import ChatCtxCache

        llm = ChatCtxCache(max_tokens=64)
        llm.invoke("What is the capital of France?")
        llm.invoke("Which lake is deepest?", document_ids=["<id from /v1/documents>"])
    """

    model_name: str = Field(default="default", alias="model")
    """Model served by the gateway (``default``: whatever it runs)."""
    openai_api_key: SecretStr | None = Field(
        alias="api_key", default_factory=secret_from_env("CTXCACHE_API_KEY", default="none"))
    openai_api_base: str | None = Field(
        alias="base_url", default_factory=from_env(("CTXCACHE_BASE_URL", "CTXCACHE_URL"),
                                                   default=DEFAULT_BASE_URL))
    semantic_cache: bool = True
    category: str | None = None
    document_ids: list[str] | None = None
    passages: list[str] | None = None
    strategy: str | None = None

    @field_validator("openai_api_base")
    @classmethod
    def _openai_path(cls, v: str | None) -> str | None:
        """The gateway's root URL works as well as its OpenAI base (``…/v1``)."""
        return v.rstrip("/") + "/v1" if v and not v.rstrip("/").endswith("/v1") else v

    @property
    def _llm_type(self) -> str:
        return "ctxcache-chat"

    @property
    def lc_secrets(self) -> dict[str, str]:
        return {"openai_api_key": "CTXCACHE_API_KEY"}

    @classmethod
    def get_lc_namespace(cls) -> list[str]:
        return ["langchain_ctxcache", "chat_models"]

    @classmethod
    def is_lc_serializable(cls) -> bool:
        # LangChain's loader only revives classes on langchain-core's own allowlist, which a
        # third-party package is not on: claiming serializability would promise a round trip
        # that ``load`` refuses.
        return False

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any):
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "ctxcache"
        return params

    def _extras(self, overrides: dict[str, Any]) -> dict[str, Any]:
        """The request extras: the model's fields, then the call's overrides."""
        out: dict[str, Any] = {}
        for name in EXTRAS:
            value = overrides.pop(name, getattr(self, name))
            if value is None or (isinstance(value, list) and not value):
                continue
            out["cache" if name == "semantic_cache" else name] = value
        return out

    def _get_request_payload(self, input_: LanguageModelInput, *,
                             stop: list[str] | None = None, **kwargs: Any) -> dict:
        extras = self._extras(kwargs)
        payload = super()._get_request_payload(input_, stop=stop, **kwargs)
        if extras:
            payload["extra_body"] = {**(payload.get("extra_body") or {}), **extras}
        return payload

    def _convert_chunk_to_generation_chunk(self, chunk: dict, default_chunk_class: type,
                                           base_generation_info: dict | None):
        out = super()._convert_chunk_to_generation_chunk(chunk, default_chunk_class,
                                                         base_generation_info)
        if out is not None and chunk.get("ctxcache") is not None:  # the final chunk
            out.message.response_metadata["ctxcache"] = chunk["ctxcache"]
        return out

    def _create_chat_result(self, response: dict | openai.BaseModel,
                            generation_info: dict | None = None) -> ChatResult:
        result = super()._create_chat_result(response, generation_info)
        meta = (response if isinstance(response, dict) else response.model_dump()
                ).get("ctxcache")
        if meta is not None:
            for g in result.generations:
                g.message.response_metadata["ctxcache"] = meta
            result.llm_output = {**(result.llm_output or {}), "ctxcache": meta}
        return result
