"""OpenAI tool calling on the embedded engine: tools rendered by the model's own chat template,
tool calls parsed from its output, and grammar constraints so the calls always parse.

Only the Hermes-style format is understood (the one Qwen2.5 templates teach: a JSON object
``{"name": ..., "arguments": {...}}`` between ``<tool_call>`` and ``</tool_call>``). A model
whose template renders no tools, or renders them in another format, is refused by name
(``ToolsUnsupportedError``) rather than silently answered without its tools.

``tool_choice``:

* ``required`` / a named function: the whole answer is constrained to one (or, with
  ``parallel_tool_calls``, several) calls whose arguments validate against the function's
  ``parameters`` schema;
* ``auto``: the model writes freely; the moment it opens a call (the ``<tool_call>`` token) the
  rest of that call is constrained the same way — llguidance's "lazy grammar" idea — so an opened
  call always parses;
* ``none``: the tools are not rendered and nothing is parsed.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from ctxcache.errors import InvalidInputError
from ctxcache.structured.grammar import (JSON_OPTIONS, Constraint, GrammarCompiler,
                                         bounded_numbers)

OPEN, CLOSE = "<tool_call>", "</tool_call>"
MAX_PARALLEL_CALLS = 8


class ToolsUnsupportedError(InvalidInputError):
    """The model's chat template has no tool format that ctxcache can render and parse."""


@dataclass
class ToolSpec:
    """Validated ``tools`` / ``tool_choice`` / ``parallel_tool_calls`` of one request."""

    tools: list[dict]  # OpenAI shape: {"type": "function", "function": {name, description, parameters}}
    choice: str = "auto"  # "auto" | "none" | "required" | "named"
    name: str | None = None  # the function when choice == "named"
    parallel: bool = False  # several calls in one answer (parallel_tool_calls: true)

    @property
    def functions(self) -> dict[str, dict]:
        return {t["function"]["name"]: t["function"] for t in self.tools}

    def rendered(self) -> list[dict] | None:
        """What the chat template sees: nothing when the model may not call a tool."""
        return None if self.choice == "none" or not self.tools else self.tools


@dataclass
class ToolCall:
    name: str
    arguments: dict
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

    def openai(self, index: int | None = None) -> dict:
        out = {"id": self.id, "type": "function",
               "function": {"name": self.name, "arguments": json.dumps(self.arguments)}}
        if index is not None:
            out["index"] = index
        return out


# ---------------------------------------------------------------------------- messages
def template_messages(messages: list[dict]) -> list[dict]:
    """OpenAI messages → what HF chat templates expect: assistant ``tool_calls`` with their
    arguments as objects (templates ``tojson`` them; a JSON string would be encoded twice)."""
    out = []
    for i, m in enumerate(messages):
        m = dict(m)
        calls = m.get("tool_calls")
        if calls:
            fixed = []
            for c in calls:
                fn = c.get("function") or {}
                args = fn.get("arguments", "{}")
                if isinstance(args, str):
                    try:
                        args = json.loads(args) if args.strip() else {}
                    except json.JSONDecodeError:
                        raise InvalidInputError(
                            f"messages[{i}].tool_calls: arguments of {fn.get('name')!r} are "
                            f"not valid JSON") from None
                fixed.append({"id": c.get("id"), "type": "function",
                              "function": {"name": fn.get("name"), "arguments": args}})
            m["tool_calls"] = fixed
        if m.get("content") is None:
            m["content"] = ""
        out.append({k: v for k, v in m.items() if v is not None})
    return out


# ---------------------------------------------------------------------------- the format
class HermesFormat:
    """Detects, constrains and parses ``<tool_call>{json}</tool_call>`` calls."""

    PROBE = {"type": "function", "function": {
        "name": "ctxcache_probe_fn", "description": "probe",
        "parameters": {"type": "object", "properties": {"x": {"type": "string"}}}}}

    def __init__(self, tokenizer, model_name: str):
        self.tokenizer = tokenizer
        self.model = model_name
        self._supported: bool | None = None
        self.trigger: int | None = None
        self._open, self._close = json.dumps(OPEN), json.dumps(CLOSE)

    def check(self) -> None:
        """Raise ``ToolsUnsupportedError`` unless the template renders tools in this format."""
        if self._supported is None:
            self._supported = self._probe()
        if not self._supported:
            raise ToolsUnsupportedError(
                f"model {self.model} does not support tool calling: its chat template has no "
                f"tool format ctxcache can render and parse ({OPEN}...{CLOSE}); use a model "
                f"that has one (e.g. qwen2.5-coder-0.5b-instruct) or send the request without "
                f"'tools'")

    @property
    def supported(self) -> bool:
        if self._supported is None:
            self._supported = self._probe()
        return self._supported

    def _probe(self) -> bool:
        tok = self.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            return False
        try:
            text = tok.apply_chat_template([{"role": "user", "content": "hi"}],
                                           tools=[self.PROBE], tokenize=False,
                                           add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - a template that cannot take tools
            return False
        if "ctxcache_probe_fn" not in text or OPEN not in text:
            return False
        ids = tok.encode(OPEN, add_special_tokens=False)
        self.trigger = ids[0] if len(ids) == 1 else None
        close = tok.encode(CLOSE, add_special_tokens=False)
        # Single added tokens are matched by id in the grammar (llguidance keeps added tokens
        # apart from text, so a literal "<tool_call>" would not match the token).
        self._open = f"<[{self.trigger}]>" if self.trigger is not None else json.dumps(OPEN)
        self._close = f"<[{close[0]}]>" if len(close) == 1 else json.dumps(CLOSE)
        return True

    # ---------------------------------------------------------------- grammars
    @staticmethod
    def call_schema(functions: dict[str, dict]) -> dict:
        """JSON schema of one call's body: the name of one of ``functions`` and arguments that
        validate against its ``parameters``."""
        alts = []
        for name, fn in functions.items():
            params = fn.get("parameters") or {"type": "object", "properties": {}}
            alts.append({"type": "object",
                         "properties": {"name": {"const": name}, "arguments": params},
                         "required": ["name", "arguments"], "additionalProperties": False})
        return alts[0] if len(alts) == 1 else {"anyOf": alts}

    def body_rule(self, functions: dict[str, dict]) -> str:
        return "body: %json " + json.dumps({**bounded_numbers(self.call_schema(functions)),
                                            "x-guidance": JSON_OPTIONS})

    def grammar_calls(self, functions: dict[str, dict], multiple: bool) -> str:
        """Lark: the whole answer is one call, or up to ``MAX_PARALLEL_CALLS`` of them."""
        rep = f'("\\n" call){{0,{MAX_PARALLEL_CALLS - 1}}}' if multiple else ""
        return "\n".join([f"start: call {rep}",
                          f'call: {self._open} "\\n" body "\\n" {self._close}',
                          self.body_rule(functions)])

    def grammar_rest_of_call(self, functions: dict[str, dict]) -> str:
        """Lark: what follows an opened ``<tool_call>`` up to its end."""
        return "\n".join([f'start: "\\n" body "\\n" {self._close}', self.body_rule(functions)])

    def constraint(self, compiler: GrammarCompiler, spec: ToolSpec) -> Constraint | None:
        fns = spec.functions
        if spec.choice == "none" or not fns:
            return None
        if spec.choice == "named":
            return compiler.constraint(compiler.lark(self.grammar_calls(
                {spec.name: fns[spec.name]}, False)), "tool parameters schema")
        if spec.choice == "required":
            return compiler.constraint(compiler.lark(self.grammar_calls(fns, spec.parallel)),
                                       "tool parameters schema")
        grammar = compiler.lark(self.grammar_rest_of_call(fns))
        bare = compiler.lark("start: body\n" + self.body_rule(fns))
        compiler.matcher(grammar, "tool parameters schema")  # validate now: a 400, not mid-decode
        return ToolCallConstraint(compiler, grammar, bare, self.trigger, spec.parallel)

    # ---------------------------------------------------------------- parsing
    def parse(self, text: str, spec: ToolSpec) -> tuple[str, list[ToolCall]]:
        """Split an answer into its content and its tool calls. A block that is not a valid
        call of a declared function stays in the content (it is not a call)."""
        if spec.choice == "none":
            return text, []
        if OPEN not in text:
            # Small models (Qwen2.5-Coder-0.5B) often answer a call as the bare JSON object,
            # without the tags, or inside a ```json fence: a whole answer that is exactly a
            # call of a declared function is taken as that call.
            body = text.strip()
            if body.startswith("```"):
                body = body[3:].removeprefix("json").removesuffix("```").strip()
            call = self._one(body, spec.functions) if body.startswith("{") else None
            return ("", [call]) if call is not None else (text, [])
        fns = spec.functions
        content, calls, pos = [], [], 0
        while True:
            a = text.find(OPEN, pos)
            if a < 0:
                content.append(text[pos:])
                break
            b = text.find(CLOSE, a)
            end = len(text) if b < 0 else b + len(CLOSE)
            call = self._one(text[a + len(OPEN): b if b >= 0 else len(text)], fns)
            if call is None and b < 0 and calls:
                break  # an unfinished call after complete ones (cut by max_tokens): dropped
            if call is None:
                content.append(text[pos:end])
            else:
                content.append(text[pos:a])
                calls.append(call)
            pos = end
        return "".join(content).strip() if calls else "".join(content), calls

    @staticmethod
    def _one(raw: str, fns: dict[str, dict]) -> ToolCall | None:
        try:
            obj = json.loads(raw.strip())
        except json.JSONDecodeError:
            return None
        if not isinstance(obj, dict) or obj.get("name") not in fns:
            return None
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                return None
        return ToolCall(obj["name"], args) if isinstance(args, dict) else None


class ToolCallConstraint(Constraint):
    """``tool_choice: auto``: dormant while the model writes text; when it opens a call — the
    ``<tool_call>`` token, or a first token that starts a bare JSON object (how small models
    often answer a call) — the rest of that call is constrained to a valid call. After a call
    it is dormant again when parallel calls are allowed; otherwise the answer must end."""

    def __init__(self, compiler: GrammarCompiler, grammar: str, bare: str, trigger: int | None,
                 parallel: bool):
        super().__init__(None, grammar)
        self.compiler = compiler
        self.bare = bare
        self.trigger = trigger
        self.parallel = parallel
        self.steps = 0
        self.calls = 0
        self._end_only = None

    @property
    def finished(self) -> bool:
        return False

    def accept(self, token: int) -> None:
        step, self.steps = self.steps, self.steps + 1
        if self.matcher is None:
            if self.trigger is not None and int(token) == self.trigger:
                self.matcher = self.compiler.matcher(self.grammar, "tool parameters schema")
            elif step == 0 and self.compiler.tokenizer.decode_str([int(token)]).lstrip() \
                    .startswith("{"):
                m = self.compiler.matcher(self.bare, "tool parameters schema")
                self.matcher = m if m.consume_token(int(token)) and not m.is_error() else None
            return
        super().accept(token)
        if self.matcher is not self._end_only and self.matcher.is_stopped():
            self.calls += 1
            if self.parallel:
                self.matcher = None
            else:  # one call only: nothing but end-of-sequence may follow
                self._end_only = self.compiler.matcher(self.compiler.lark('start: ""'),
                                                       "end of answer")
                self.matcher = self._end_only


class ToolStreamFilter:
    """Streams the content of an answer while holding back anything that may be the start of a
    tool call; ``finish`` returns the rest of the content and the parsed calls."""

    def __init__(self, fmt: HermesFormat, spec: ToolSpec):
        self.fmt, self.spec = fmt, spec
        self.text = ""
        self.sent = 0
        self.in_call = False

    def push(self, delta: str) -> str:
        self.text += delta
        if self.in_call:
            return ""
        a = self.text.find(OPEN, self.sent)
        if a >= 0:
            self.in_call = True
            out, self.sent = self.text[self.sent:a], a
            return out
        # hold back a tail that could still grow into "<tool_call>"
        hold = 0
        for k in range(min(len(OPEN) - 1, len(self.text) - self.sent), 0, -1):
            if OPEN.startswith(self.text[-k:]):
                hold = k
                break
        out = self.text[self.sent: len(self.text) - hold]
        self.sent += len(out)
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        content, calls = self.fmt.parse(self.text, self.spec)
        if not calls:
            return self.text[self.sent:], []
        # content already streamed is the text before the first call
        rest, _ = self.fmt.parse(self.text[self.sent:], self.spec)
        return rest, calls


def parse_tool_spec(tools: list[dict] | None, tool_choice: Any, parallel: bool | None
                    ) -> ToolSpec | None:
    """Validate the OpenAI request fields into a ``ToolSpec`` (``InvalidInputError`` naming the
    field otherwise)."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise InvalidInputError("tool_choice needs 'tools'")
        return None
    seen = set()
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or \
                not isinstance(fn, dict):
            raise InvalidInputError(f"tools[{i}] must be {{'type': 'function', 'function': "
                                    f"{{...}}}}")
        name = fn.get("name")
        if not isinstance(name, str) or not name or len(name) > 64 or \
                not all(c.isalnum() or c in "_-" for c in name):
            raise InvalidInputError(f"tools[{i}].function.name must be 1-64 characters of "
                                    f"a-z, A-Z, 0-9, _ and -")
        if name in seen:
            raise InvalidInputError(f"tools[{i}].function.name {name!r} is declared twice")
        seen.add(name)
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise InvalidInputError(f"tools[{i}].function.parameters must be a JSON schema "
                                    f"object")
    choice, name = "auto", None
    if tool_choice is None or tool_choice in ("auto", "none", "required"):
        choice = tool_choice or "auto"
    elif isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict):
        choice, name = "named", tool_choice["function"].get("name")
        if name not in seen:
            raise InvalidInputError(f"tool_choice names {name!r}, which is not in 'tools'")
    else:
        raise InvalidInputError("tool_choice must be 'auto', 'none', 'required' or "
                                "{'type': 'function', 'function': {'name': ...}}")
    # Several calls in one answer only when asked for explicitly: with the OpenAI default
    # (parallel allowed) small models such as Qwen2.5-Coder-0.5B keep appending calls of the same
    # function with made-up arguments until max_tokens (measured under tool_choice required).
    return ToolSpec([{"type": "function", "function": t["function"]} for t in tools], choice,
                    name, bool(parallel))
