"""Pydantic models: the HTTP contract (OpenAI-compatible and native)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ctxcache.errors import InvalidInputError
from ctxcache.kv.keys import check_tenant_name

BAD_UNICODE = ("text contains an unpaired UTF-16 surrogate (such as \\udcff escaped in the "
               "JSON), which is not valid Unicode; send valid UTF-8 text")


MAX_MESSAGES = 10_000  # hard cap of the schema; settings.max_messages is the working limit
MAX_DEPTH = 32  # JSON nesting a request may have (tool schemas included)


def _check_unicode(v: Any) -> None:
    """JSON may escape lone surrogates that no UTF-8 encoder accepts, and NUL characters that
    PostgreSQL cannot store: reject both up front, the same on every backend, so no tokenizer,
    embedder or database meets them later. Iterative, with a depth bound: a body nested
    thousands deep is refused, not a recursion error."""
    stack = [(v, 0)]
    while stack:
        x, depth = stack.pop()
        if isinstance(x, str):
            if "\0" in x:
                raise ValueError("text contains a NUL character (\\u0000), which is not accepted")
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(BAD_UNICODE) from None
        elif isinstance(x, (dict, list, tuple)):
            if depth >= MAX_DEPTH:
                raise ValueError(f"JSON nested more than {MAX_DEPTH} levels deep")
            items = x.items() if isinstance(x, dict) else ((None, y) for y in x)
            for k, y in items:
                if k is not None:
                    stack.append((k, depth + 1))
                stack.append((y, depth + 1))


class _Checked(BaseModel):
    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        _check_unicode(data)
        return data


class _Loose(_Checked):
    # OpenAI clients send fields we do not use (logprobs, user, ...): accept and ignore them.
    model_config = ConfigDict(extra="allow")


class ContentPart(_Checked):
    """One part of a message's content. Only text parts are accepted: this server's models read
    text only, and a dropped image would be a silent wrong answer."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_only(self):
        if self.type != "text":
            raise ValueError(f"content part type {self.type!r} is not supported (text only)")
        if self.text is None:
            raise ValueError("a text content part needs 'text' (a string)")
        return self


class ChatMessage(_Loose):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | Annotated[list[ContentPart], Field(max_length=1024)] | None = None
    tool_calls: list[dict] | None = Field(None, max_length=64,
                                          description="an assistant turn's tool calls")
    tool_call_id: str | None = Field(None, max_length=256,
                                     description="the call a tool message answers")
    name: str | None = Field(None, max_length=256)

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts (text only, see ContentPart)
            return "".join(p.text or "" for p in self.content)
        return self.content or ""


class SamplingFields(_Loose):
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = Field(None, validate_default=True)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    n: int = Field(1, ge=1, le=1, description="only n=1 is supported")
    stream: bool = False

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if v is None:
            return []
        v = [v] if isinstance(v, str) else v
        if len(v) > 4 or any(not s for s in v):
            raise ValueError("stop must be up to 4 non-empty strings")
        return v


# OpenAI request fields that carry no instruction for the generation itself: accepted as they
# are. Any other field we do not implement is refused with a 400 naming it when it asks for
# something (``NOT_DEFAULT``), so no field is silently ignored.
METADATA_FIELDS = {"user", "metadata", "service_tier", "store", "safety_identifier",
                   "prompt_cache_key"}
NOT_DEFAULT = {"frequency_penalty": (0, 0.0, None), "presence_penalty": (0, 0.0, None),
               "logit_bias": (None, {}), "logprobs": (False, None), "top_logprobs": (None, 0),
               "functions": (None, []), "function_call": (None, "none", "auto"),
               "modalities": (None, ["text"]), "audio": (None,), "prediction": (None,),
               "reasoning_effort": (None,), "web_search_options": (None,),
               "verbosity": (None,), "suffix": (None, ""), "best_of": (None, 1)}


def refuse_unsupported(extra: dict | None) -> None:
    for k, v in (extra or {}).items():
        if k in METADATA_FIELDS:
            if k == "store" and v:
                raise ValueError("store=true is not supported (ctxcache does not keep "
                                 "completions for later retrieval)")
            continue
        if k in NOT_DEFAULT:
            if any(v == d and type(v) is type(d) or (v is None and d is None)
                   for d in NOT_DEFAULT[k]):
                continue
            raise ValueError(f"'{k}' is not supported by this server")
        raise ValueError(f"unknown field '{k}'")


class ChatCompletionRequest(SamplingFields):
    model: str
    messages: list[ChatMessage] = Field(
        min_length=1, max_length=MAX_MESSAGES,
        description=f"at most {MAX_MESSAGES} here; the server's max_messages setting may be lower")
    tools: list[dict] | None = Field(None, max_length=128)
    tool_choice: str | dict | None = Field(
        None, description="'auto' (default with tools), 'none', 'required' or "
                          "{'type': 'function', 'function': {'name': ...}}")
    parallel_tool_calls: bool | None = None
    response_format: dict | None = Field(
        None, description="{'type': 'text' | 'json_object' | 'json_schema', ...}: the answer "
                          "is constrained by a grammar to valid JSON (of the schema)")
    stream_options: dict | None = None
    # ctxcache extensions (ignored by other servers)
    cache: bool = True
    category: str | None = None
    document_ids: list[str] = Field(
        default_factory=list, max_length=64,
        description="ingested documents to answer from: their chunk K/V is reused")
    passages: list[str] = Field(default_factory=list, max_length=64,
                                description="passages to answer from (cached as chunks)")
    strategy: str | None = Field(
        None, description="reuse strategy: for documents/passages, or for the conversation "
                          "itself (a non-prefix strategy reuses its messages under another "
                          "system prompt; default: exact prefix reuse)")

    @model_validator(mode="after")
    def _no_ignored_fields(self):
        refuse_unsupported(self.model_extra)
        return self


class CompletionRequest(SamplingFields):
    model: str
    prompt: str | list[str]
    echo: bool = False
    cache: bool = True
    category: str | None = None
    stream_options: dict | None = None

    @model_validator(mode="after")
    def _no_ignored_fields(self):
        if self.echo:
            raise ValueError("echo=true is not supported")
        refuse_unsupported(self.model_extra)
        return self

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("only a single prompt is supported")
            v = v[0]
        if not v:
            raise ValueError("prompt must not be empty")
        return v


class DocumentIn(_Checked):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1, max_length=2_000_000)
    title: str | None = Field(None, max_length=512)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("text")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("document text is blank (only whitespace): nothing to ingest")
        return v


class DocumentsRequest(_Checked):
    model_config = ConfigDict(extra="forbid")
    documents: list[DocumentIn] = Field(min_length=1, max_length=256)
    public: bool = False


class RagRequest(_Checked):
    model_config = ConfigDict(extra="forbid")
    question: str = Field(min_length=1, max_length=20_000)
    document_ids: list[str] = Field(default_factory=list, max_length=64)
    passages: list[str] = Field(default_factory=list, max_length=64)
    system: str | None = Field(None, max_length=20_000)
    strategy: str | None = None
    recompute_ratio: float | None = Field(None, ge=0.0, le=1.0)
    max_tokens: int = Field(128, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list, max_length=4)
    cache: bool = True
    stream: bool = False


class AgentSessionRequest(_Checked):
    model_config = ConfigDict(extra="forbid")
    shared_context: str = Field("", max_length=200_000)
    agents: dict[str, str] = Field(default_factory=dict,
                                   description="agent name → its own system prompt")


class AgentMessage(_Checked):
    model_config = ConfigDict(extra="forbid")
    agent: str = Field(min_length=1, max_length=64)
    content: str = Field(min_length=1, max_length=100_000)


class AgentGenerate(_Checked):
    model_config = ConfigDict(extra="forbid")
    agent: str = Field(min_length=1, max_length=64)
    max_tokens: int = Field(128, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    strategy: str | None = None
    append: bool = True  # add the answer to the session as the agent's message


class ClientCacheLookup(_Checked):
    """A client-side cache (e.g. LangChain's LLM cache) asking the semantic cache."""

    prompt: str = Field(min_length=1, max_length=100_000)
    scope: str = Field("", max_length=20_000,
                       description="everything besides the prompt that changes the answer "
                                   "(model and its parameters, history): entries of another "
                                   "scope never match")
    category: str | None = None


class ClientCacheEntry(ClientCacheLookup):
    value: Any = Field(description="any JSON value, returned as is on a hit")


class FlushRequest(_Checked):
    model_config = ConfigDict(extra="forbid")
    tenant: str | None = None
    category: str | None = None
    document_id: str | None = None
    semantic: bool = True
    kv: bool = False


class KeyRequest(_Checked):
    model_config = ConfigDict(extra="forbid")
    tenant: str = Field(min_length=1, max_length=64,
                        description="letters, digits, _ . - (starting with a letter or digit); "
                                    "not a reserved name (admin, default, public, ...)")
    name: str = ""
    rate_limit_per_min: int = Field(600, ge=1, le=10**9)

    @field_validator("tenant")
    @classmethod
    def _tenant(cls, v: str) -> str:
        try:
            return check_tenant_name(v)
        except InvalidInputError as e:  # → a validation error naming the field
            raise ValueError(str(e)) from None
