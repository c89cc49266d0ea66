"""OpenAI ``response_format`` → a grammar constraint: ``json_object`` (any JSON object) and
``json_schema`` (the answer validates against the schema, every time — the grammar admits no
other token). ``text`` needs no constraint."""

from __future__ import annotations

from typing import Any

from ctxcache.errors import InvalidInputError
from ctxcache.structured.grammar import Constraint, GrammarCompiler

ANY_OBJECT = {"type": "object"}


def response_schema(response_format: Any) -> dict | bool | None:
    """The JSON schema the answer must satisfy, or None for plain text; ``InvalidInputError``
    naming the field for a malformed value."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict) or "type" not in response_format:
        raise InvalidInputError("response_format must be an object with a 'type'")
    kind = response_format["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return ANY_OBJECT
    if kind == "json_schema":
        js = response_format.get("json_schema")
        if not isinstance(js, dict):
            raise InvalidInputError("response_format.json_schema must be an object with "
                                    "'name' and 'schema'")
        name = js.get("name")
        if name is not None and (not isinstance(name, str) or not name or len(name) > 64):
            raise InvalidInputError("response_format.json_schema.name must be 1-64 characters")
        schema = js.get("schema", ANY_OBJECT)
        if not isinstance(schema, (dict, bool)):
            raise InvalidInputError("response_format.json_schema.schema must be a JSON schema "
                                    "object")
        return schema
    raise InvalidInputError(f"response_format type {kind!r} is not supported "
                            f"(use 'text', 'json_object' or 'json_schema')")


def response_constraint(compiler: GrammarCompiler, schema: dict | bool) -> Constraint:
    return compiler.constraint(compiler.json_schema(schema), "response_format JSON schema")
