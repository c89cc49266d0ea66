"""Structured output: grammar-constrained decoding (JSON schemas, tool calls) and OpenAI tool
calling for the embedded engine."""

from ctxcache.structured.grammar import (Constraint, GrammarCompiler, GrammarUnavailableError,
                                         apply_mask)
from ctxcache.structured.response_format import response_constraint, response_schema
from ctxcache.structured.tools import (HermesFormat, ToolCall, ToolSpec, ToolsUnsupportedError,
                                       ToolStreamFilter, parse_tool_spec, template_messages)

__all__ = ["Constraint", "GrammarCompiler", "GrammarUnavailableError", "apply_mask",
           "response_constraint", "response_schema", "HermesFormat", "ToolCall", "ToolSpec",
           "ToolsUnsupportedError", "ToolStreamFilter", "parse_tool_spec", "template_messages"]
