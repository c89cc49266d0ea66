"""Grammar-constrained decoding: a per-request token mask that only admits continuations of a
grammar (a JSON schema, "any JSON object", or the tool-call format).

Backed by llguidance: ``benchmarks/structured.py`` measured its mask fill at 29 µs per token
(p50; p99 333 µs) on the H200 machine's host, 0.6 % of a 4.65 ms batched decode step. Each
request owns one ``Constraint``; the serving engine fills the masks of all constrained rows of a
batch in one call, applies them to the logits on the device, samples, and tells each constraint
which token was taken.

Grammars are written in llguidance's Lark dialect, where ``%json {schema}`` embeds a JSON
schema; ``GrammarCompiler`` validates them up front, so a bad schema is a 400 for that request,
never an error mid-decode.
"""

from __future__ import annotations

import threading
from typing import Sequence

import torch
from torch import Tensor

from ctxcache.errors import InvalidInputError


# Whitespace between JSON tokens is bounded: unbounded whitespace lets a small model loop on
# newlines until max_tokens (measured on Qwen2.5-Coder-0.5B). One spot takes nothing, a space,
# or a newline with up to 8 spaces of indent: the model's own pretty-printed style still fits,
# but not the runs of 12 spaces after every colon that a looser pattern ([ \n]{0,12}) let the
# 0.5B model write until max_tokens.
JSON_OPTIONS = {"whitespace_flexible": False, "whitespace_pattern": r"( |\n {0,8})?"}

# Numbers without bounds in the schema are kept within the range JSON parsers represent exactly
# (RFC 7493, I-JSON: integers of magnitude below 2^53): an unbounded integer lets a small model
# write digits until max_tokens ("10000000000000000000…", measured), and no parser would read
# such a value back exactly anyway. The request's schema is untouched (answers are validated
# against it); only the grammar carries the bound.
SAFE_INTEGER = 2 ** 53 - 1


def bounded_numbers(schema):
    """``schema`` with ``minimum``/``maximum`` of ±``SAFE_INTEGER`` on every integer or number
    subschema that has no bound of its own on that side (a copy; anything else unchanged)."""
    if isinstance(schema, list):
        return [bounded_numbers(x) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: bounded_numbers(v) for k, v in schema.items()}
    t = schema.get("type")
    types = {t} if isinstance(t, str) else set(t) if isinstance(t, list) else set()
    if types and types <= {"integer", "number", "null"} and types & {"integer", "number"} \
            and "enum" not in out and "const" not in out:  # listed values are bounded already
        lo = out.get("minimum", out.get("exclusiveMinimum"))
        hi = out.get("maximum", out.get("exclusiveMaximum"))
        # a side is bounded only where the schema's other bound leaves room inside the range
        if lo is None and (not isinstance(hi, (int, float)) or hi > -SAFE_INTEGER):
            out["minimum"] = -SAFE_INTEGER
        if hi is None and (not isinstance(lo, (int, float)) or lo < SAFE_INTEGER):
            out["maximum"] = SAFE_INTEGER
    return out


class GrammarUnavailableError(InvalidInputError):
    """Structured output was asked for but the grammar library is not installed."""


def _llguidance():
    try:
        import llguidance
        import llguidance.hf
    except ImportError as e:  # pragma: no cover - it is a core dependency
        raise GrammarUnavailableError(
            "structured output needs the llguidance package (pip install llguidance)") from e
    return llguidance


class Constraint:
    """One request's position in its grammar. ``matcher`` is the llguidance matcher whose mask
    applies to the next token, or None while the constraint is dormant (see
    ``tools.ToolCallConstraint``, which only wakes when the model opens a tool call)."""

    def __init__(self, matcher, grammar: str = ""):
        self.matcher = matcher
        self.grammar = grammar

    @property
    def finished(self) -> bool:
        """The grammar is complete: only end-of-sequence may follow."""
        return self.matcher is not None and self.matcher.is_stopped()

    def accept(self, token: int) -> None:
        """Advance past a sampled token (which the mask allowed)."""
        if self.matcher is None:
            return
        if not self.matcher.consume_token(int(token)) or self.matcher.is_error():
            # Only reachable if a caller sampled outside the mask: a bug, not bad input.
            raise RuntimeError(f"grammar rejected token {token}: {self.matcher.get_error()}")


class GrammarCompiler:
    """Per engine tokenizer: wraps it for llguidance once (about a second) and makes
    ``Constraint``s from grammars. Thread-safe."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: Sequence[int]):
        if tokenizer is None:
            raise InvalidInputError("structured output needs a model with a tokenizer")
        self._hf = tokenizer
        self.vocab_size = int(vocab_size)
        self._eos = [int(t) for t in eos_token_ids] or None
        self._tok = None
        self._lock = threading.Lock()
        self._executor = None
        self._bit = torch.ones(32, dtype=torch.int32) << torch.arange(32, dtype=torch.int32)

    @property
    def tokenizer(self):
        with self._lock:
            if self._tok is None:
                llg = _llguidance()
                self._tok = llg.hf.from_tokenizer(self._hf, n_vocab=self.vocab_size,
                                                  eos_token=self._eos)
                self._executor = llg.LLExecutor()
            return self._tok

    @property
    def mask_words(self) -> int:
        return (self.vocab_size + 31) // 32

    # ------------------------------------------------------------------ grammars
    @staticmethod
    def json_schema(schema: dict | bool) -> str:
        """A grammar for JSON values that validate against ``schema``."""
        llg = _llguidance()
        try:
            return llg.LLMatcher.grammar_from_json_schema(bounded_numbers(schema),
                                                          defaults=JSON_OPTIONS)
        except (ValueError, TypeError) as e:
            raise InvalidInputError(f"unsupported JSON schema: {e}") from None

    @staticmethod
    def lark(text: str) -> str:
        return _llguidance().LLMatcher.grammar_from_lark(text)

    def matcher(self, grammar: str, what: str = "grammar"):
        llg = _llguidance()
        tok = self.tokenizer
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, tok)
        if is_error:
            raise InvalidInputError(f"invalid {what}: {'; '.join(messages)[:500]}")
        m = llg.LLMatcher(tok, grammar, log_level=0)
        if m.is_error():
            raise InvalidInputError(f"invalid {what}: {m.get_error()[:500]}")
        return m

    def constraint(self, grammar: str, what: str = "grammar") -> Constraint:
        return Constraint(self.matcher(grammar, what), grammar)

    # ------------------------------------------------------------------ masks
    def fill(self, matchers: Sequence) -> Tensor:
        """The allowed-token bitmask [len(matchers), mask_words] (int32, host), computed for
        all rows in one call (llguidance spreads rows over threads)."""
        _ = self.tokenizer
        out = torch.empty(len(matchers), self.mask_words, dtype=torch.int32)
        if len(matchers) == 1:
            matchers[0].unsafe_compute_mask_ptr(out.data_ptr(), self.mask_words * 4)
        else:
            self._executor.unsafe_compute_mask_ptr(
                [(m, i) for i, m in enumerate(matchers)], out.data_ptr(),
                self.mask_words * 4, len(matchers))
        if self._eos:
            # llguidance admits one end-of-sequence token; a chat model may end its turn with
            # another (Qwen: <|im_end|> beside <|endoftext|>), so allow every one of them.
            for i, m in enumerate(matchers):
                if m.is_accepting():
                    for t in self._eos:
                        out[i, t // 32] |= self._bit[t % 32]
        return out


_BITS: dict[torch.device, Tensor] = {}


def apply_mask(logits: Tensor, bitmask: Tensor) -> Tensor:
    """The logits with the tokens the bitmask forbids set to -inf. ``logits`` [B, V] on any
    device, ``bitmask`` [B, ceil(V/32)] int32 on the host (bit j of word w = token 32*w + j).
    Logit columns beyond the mask (padding of the embedding matrix) are forbidden too."""
    dev = logits.device
    bits = _BITS.get(dev)
    if bits is None:
        bits = _BITS[dev] = torch.arange(32, dtype=torch.int32, device=dev)
    m = bitmask.to(dev, non_blocking=True)
    allowed = ((m.unsqueeze(-1) >> bits) & 1).reshape(m.shape[0], -1).bool()
    v = logits.shape[-1]
    if allowed.shape[1] >= v:
        allowed = allowed[:, :v]
    else:
        pad = torch.zeros(m.shape[0], v - allowed.shape[1], dtype=torch.bool, device=dev)
        allowed = torch.cat([allowed, pad], dim=1)
    return logits.masked_fill(~allowed, float("-inf"))

