"""Structured output and tool calling on the real Qwen2.5-Coder-0.5B-Instruct: grammar-constrained
decoding inside the batched engine, the tool-call format, and the OpenAI API end to end (real
HTTP server, the ``openai`` client)."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

from ctxcache.engine import SamplingParams
from ctxcache.engine.scheduler import EngineRequest, ServingEngine
from ctxcache.errors import InvalidInputError
from ctxcache.fusion import FusionContext, Planner, Segment, default_strategies
from ctxcache.kv import KVStore, MemoryTier
from ctxcache.structured import (HermesFormat, ToolStreamFilter, parse_tool_spec,
                                 response_constraint, template_messages)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"},
                                                    "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"colors": {"type": "array", "items": {"type": "string"},
                                                 "minItems": 2, "maxItems": 3}},
     "required": ["colors"], "additionalProperties": False},
    {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]},
                                      "confidence": {"type": "number"}},
     "required": ["answer", "confidence"], "additionalProperties": False},
]
PROMPTS = ["Describe a fictional person as JSON.", "List some colors of the rainbow as JSON.",
           "Is the sky blue? Answer as JSON."]


# ---------------------------------------------------------------------------- pure parts
def test_tool_spec_validation_names_the_problem():
    assert parse_tool_spec(None, None, None) is None
    spec = parse_tool_spec([WEATHER, ADD], {"type": "function", "function": {"name": "add"}},
                           False)
    assert spec.choice == "named" and spec.name == "add" and not spec.parallel
    for tools, choice, msg in [
            ([{"type": "retrieval"}], None, r"tools\[0\]"),
            ([{"type": "function", "function": {"name": "bad name"}}], None, "name"),
            ([WEATHER, WEATHER], None, "declared twice"),
            ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "nope"),
            ([WEATHER], "sometimes", "tool_choice"),
            (None, "required", "needs 'tools'")]:
        with pytest.raises(InvalidInputError, match=msg):
            parse_tool_spec(tools, choice, None)


def test_hermes_parsing_keeps_non_calls_as_content():
    fmt = HermesFormat(None, "m")
    spec = parse_tool_spec([WEATHER, ADD], "auto", None)
    text, calls = fmt.parse('Sure.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}'
                            '\n</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": '
                            '{"city": "Oslo", "unit": "celsius"}}\n</tool_call>', spec)
    assert text == "Sure." and [c.name for c in calls] == ["add", "get_weather"]
    assert calls[0].arguments == {"a": 1, "b": 2}
    assert json.loads(calls[1].openai()["function"]["arguments"])["city"] == "Oslo"
    # not a call: unknown function, broken JSON, plain JSON content
    for t in ['<tool_call>{"name": "rm", "arguments": {}}</tool_call>',
              '<tool_call>{"name": "add", "arguments": {</tool_call>', '{"a": 1}']:
        assert fmt.parse(t, spec) == (t, [])
    # a bare call object (what small models often write) is a call
    assert fmt.parse('{"name": "add", "arguments": {"a": 3, "b": 4}}', spec)[1][0].arguments == \
        {"a": 3, "b": 4}
    assert fmt.parse('<tool_call>{"name": "add", "arguments": {}}</tool_call>',
                     parse_tool_spec([ADD], "none", None))[1] == []


def test_stream_filter_holds_back_a_call_opening():
    fmt = HermesFormat(None, "m")
    f = ToolStreamFilter(fmt, parse_tool_spec([ADD], "auto", None))
    out = [f.push(d) for d in ["Let me add. ", "<tool", "_call>\n", '{"name": "add", ',
                               '"arguments": {"a": 1, "b": 2}}\n</tool_call>']]
    assert "".join(out) == "Let me add. " and "<tool" not in "".join(out)
    rest, calls = f.finish()
    assert rest == "" and calls[0].name == "add"
    g = ToolStreamFilter(fmt, parse_tool_spec([ADD], "auto", None))
    assert g.push("a <b> c <") + g.finish()[0] == "a <b> c <"


def test_template_messages_turn_argument_strings_into_objects():
    msgs = template_messages([
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
        {"role": "tool", "content": "3", "tool_call_id": "c1"}])
    assert msgs[0]["content"] == "" and msgs[0]["tool_calls"][0]["function"]["arguments"] == \
        {"a": 1, "b": 2}
    with pytest.raises(InvalidInputError, match="not valid JSON"):
        template_messages([{"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "add", "arguments": "{oops"}}]}])


# ---------------------------------------------------------------------------- engine
@pytest.fixture(scope="module")
def serving(qwen):
    se = ServingEngine(qwen, max_running=8).start()
    yield se
    se.close()


def submit(qwen, se, messages, constraint=None, max_tokens=48, tools=None):
    ids = qwen.chat_ids(messages, tools=tools)
    ctx = FusionContext(qwen, KVStore([MemoryTier(1 << 28)]), "t")
    planner = Planner(default_strategies(), default="full")
    segs = [Segment.chunk(ids)]
    return se.submit(EngineRequest(lambda: planner.run(ctx, segs, "full"),
                                   SamplingParams(max_tokens=max_tokens), len(ids), 0, None,
                                   constraint))


def text_of(handle) -> tuple[str, str]:
    chunks = list(handle)
    return "".join(c.text for c in chunks), chunks[-1].finish_reason


def test_json_schema_answers_validate_in_one_batch_beside_free_text(qwen, serving):
    free = [{"role": "user", "content": "Name a fruit."}]
    alone, _ = text_of(submit(qwen, serving, free, max_tokens=24))
    handles = [submit(qwen, serving, [{"role": "user", "content": p}],
                      response_constraint(qwen.grammar, s), max_tokens=96)
               for p, s in zip(PROMPTS, SCHEMAS)]
    beside = submit(qwen, serving, free, max_tokens=24)
    for h, schema in zip(handles, SCHEMAS):
        text, finish = text_of(h)
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), schema)
    assert text_of(beside)[0] == alone  # the masks of other rows do not leak into this one


def test_bad_schema_is_refused_before_decoding(qwen):
    with pytest.raises(InvalidInputError, match="response_format"):
        response_constraint(qwen.grammar, {"type": "object", "properties": {"a": {"$ref": "#/x"}}})


def test_unbounded_numbers_and_whitespace_are_bounded_in_the_grammar(qwen):
    """An integer or number without bounds takes at most 16 digits before its point (the
    grammar carries ±(2^53 - 1); the request's schema is left as it was), a bound of the
    schema's own is kept, and a whitespace spot takes one space or a newline with a short
    indent, not a run of twelve spaces (what the 0.5B model wrote until max_tokens)."""
    from ctxcache.structured.grammar import SAFE_INTEGER, bounded_numbers

    schema = {"type": "object", "properties": {
        "n": {"type": "integer"}, "x": {"type": ["number", "null"]},
        "k": {"type": "integer", "maximum": 5}, "s": {"type": "string"},
        "a": {"type": "array", "items": {"type": "number"}}}}
    before = json.dumps(schema)
    b = bounded_numbers(schema)
    assert json.dumps(schema) == before  # a copy: the request's schema is untouched
    p = b["properties"]
    assert p["n"]["minimum"] == -SAFE_INTEGER and p["n"]["maximum"] == SAFE_INTEGER
    assert p["x"]["maximum"] == SAFE_INTEGER and p["a"]["items"]["minimum"] == -SAFE_INTEGER
    assert p["k"]["maximum"] == 5 and p["k"]["minimum"] == -SAFE_INTEGER
    assert "minimum" not in p["s"]
    big = {"type": "integer", "enum": [10 ** 20]}  # a listed value beyond the bound stays valid
    assert bounded_numbers(big) == big
    huge = {"type": "integer", "minimum": 10 ** 20}  # no maximum below its own minimum
    assert bounded_numbers(huge) == huge
    g = qwen.grammar
    one = qwen.encode("1")
    assert len(one) == 1
    for key in ("n", "x"):
        sub = {"type": "object", "properties": {key: schema["properties"][key]}, "required": [key]}
        m = g.matcher(g.json_schema(sub))
        assert all(m.consume_token(t) for t in qwen.encode(f'{{"{key}": '))
        digits = 0
        while digits < 40 and m.consume_token(one[0]):
            digits += 1
        assert digits == 16, (key, digits)
    m = g.matcher(g.json_schema({"type": "object", "properties": {"s": {"type": "string"}}}))
    assert not all(m.consume_token(t) for t in qwen.encode('{"s":' + " " * 12 + '"'))
    m = g.matcher(g.json_schema({"type": "object", "properties": {"s": {"type": "string"}}}))
    assert all(m.consume_token(t) for t in qwen.encode('{\n  "s": "ok"\n}'))


def test_required_tool_call_always_parses(qwen, serving):
    fmt = qwen.tool_format
    fmt.check()
    spec = parse_tool_spec([WEATHER, ADD], "required", False)
    h = submit(qwen, serving, [{"role": "user", "content": "How warm is it in Lisbon?"}],
               fmt.constraint(qwen.grammar, spec), max_tokens=64, tools=spec.tools)
    text, finish = text_of(h)
    content, calls = fmt.parse(text, spec)
    assert finish == "stop" and len(calls) == 1 and content == ""
    fn = spec.functions[calls[0].name]
    jsonschema.validate(calls[0].arguments, fn["parameters"])


def test_model_without_a_tool_format_is_refused_by_name(engine):
    with pytest.raises(InvalidInputError, match="smollm2-135m-instruct does not support tool"):
        engine.chat_ids([{"role": "user", "content": "hi"}], tools=[ADD])


# ---------------------------------------------------------------------------- HTTP + openai
@pytest.fixture(scope="module")
def qwen_gateway(qwen, tmp_path_factory):
    from ctxcache.semantic import TransformerEmbedder
    from tests.test_service import Server, make_gateway

    from ctxcache.service.app import create_app

    gw = make_gateway(tmp_path_factory.mktemp("qwen"), qwen, TransformerEmbedder(),
                      model="qwen2.5-coder-0.5b-instruct")
    srv = Server(create_app(gateway=gw))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(qwen_gateway):
    from openai import OpenAI

    return OpenAI(base_url=qwen_gateway.url + "/v1", api_key="none", timeout=300)


def streamed_tool_calls(stream) -> tuple[list, str | None]:
    """(tool-call deltas, finish reason) of a streamed chat completion."""
    deltas, finish = [], None
    for ev in stream:
        for c in ev.choices:
            deltas += c.delta.tool_calls or []
            finish = c.finish_reason or finish
    return deltas, finish


def test_openai_tool_calling_round_trip(client):
    msgs = [{"role": "user", "content": "What is 17 plus 25? Use the add tool."}]
    r = client.chat.completions.create(model="default", messages=msgs, tools=[ADD, WEATHER],
                                       tool_choice="required", max_tokens=64,
                                       parallel_tool_calls=False)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.tool_calls
    call = ch.message.tool_calls[0]
    args = json.loads(call.function.arguments)
    assert call.function.name == "add" and {"a", "b"} <= set(args)
    # the tool's answer goes back; the model answers in text
    msgs += [ch.message.model_dump(exclude_none=True),
             {"role": "tool", "tool_call_id": call.id, "content": str(args["a"] + args["b"])}]
    r2 = client.chat.completions.create(model="default", messages=msgs, tools=[ADD],
                                        max_tokens=32)
    assert r2.choices[0].finish_reason in ("stop", "tool_calls")
    assert r2.choices[0].message.content or r2.choices[0].message.tool_calls


def test_openai_tool_calls_stream_as_deltas(client):
    stream = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Weather in Oslo, in celsius?"}],
        tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=64, stream=True)
    deltas, finish = streamed_tool_calls(stream)
    assert finish == "tool_calls" and deltas[0].function.name == "get_weather"
    args = json.loads("".join(d.function.arguments or "" for d in deltas))
    jsonschema.validate(args, WEATHER["function"]["parameters"])


def test_tools_and_response_format_pass_through_the_sglang_backend(qwen, tmp_path):
    """The gateway with the SGLang backend passes tools, tool_choice and response_format to
    SGLang's OpenAI endpoint and turns its tool_calls (whole or as deltas) back into OpenAI
    tool calls. The server on the other side is our engine behind SGLang's HTTP schema
    (``ctxcache engine --api sglang``), which honours these fields as SGLang does."""
    from openai import OpenAI

    from ctxcache.semantic import TransformerEmbedder
    from ctxcache.service.app import create_app
    from ctxcache.service.backends import SGLangBackend
    from ctxcache.service.sglang_server import create_sglang_app
    from tests.test_service import Server, make_gateway

    sg = Server(create_sglang_app(qwen))
    try:
        # SGLang's schema itself: a required call comes back as tool_calls
        r = httpx.post(sg.url + "/v1/chat/completions", timeout=300, json={
            "model": "default", "max_tokens": 64, "tools": [ADD], "tool_choice": "required",
            "messages": [{"role": "user", "content": "What is 17 plus 25?"}]}).json()
        ch = r["choices"][0]
        assert ch["finish_reason"] == "tool_calls"
        assert ch["message"]["tool_calls"][0]["function"]["name"] == "add"
        bad = httpx.post(sg.url + "/v1/chat/completions", timeout=60, json={
            "model": "default", "tools": [{"type": "retrieval"}],
            "messages": [{"role": "user", "content": "hi"}]})
        assert bad.status_code == 400 and "tools" in bad.text
        gw = make_gateway(tmp_path, qwen, TransformerEmbedder(), backend=SGLangBackend(sg.url),
                          model="qwen2.5-coder-0.5b-instruct")
        srv = Server(create_app(gateway=gw))
        try:
            c = OpenAI(base_url=srv.url + "/v1", api_key="none", timeout=300)
            r = c.chat.completions.create(
                model="default", max_tokens=64, tools=[ADD, WEATHER], tool_choice="required",
                messages=[{"role": "user", "content": "What is 17 plus 25? Use the add tool."}])
            call = r.choices[0].message.tool_calls[0]
            assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "add"
            assert {"a", "b"} <= set(json.loads(call.function.arguments))
            stream = c.chat.completions.create(
                model="default", max_tokens=64, stream=True, tools=[WEATHER],
                tool_choice={"type": "function", "function": {"name": "get_weather"}},
                messages=[{"role": "user", "content": "Weather in Oslo, in celsius?"}])
            deltas, finish = streamed_tool_calls(stream)
            assert finish == "tool_calls" and deltas[0].function.name == "get_weather"
            jsonschema.validate(json.loads("".join(d.function.arguments or "" for d in deltas)),
                                WEATHER["function"]["parameters"])
            r = c.chat.completions.create(
                model="default", max_tokens=64, messages=[
                    {"role": "user", "content": "Invent a person."}],
                response_format={"type": "json_schema", "json_schema": {
                    "name": "person", "schema": SCHEMAS[0], "strict": True}})
            jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMAS[0])
        finally:
            srv.stop()
    finally:
        sg.stop()


def test_openai_response_format_json_schema(client):
    schema = SCHEMAS[0]
    r = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Invent a person."}],
        max_tokens=64, response_format={"type": "json_schema", "json_schema": {
            "name": "person", "schema": schema, "strict": True}})
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    r = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Give a JSON object with a key."}],
        max_tokens=48, response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_unsupported_fields_are_refused_by_name(qwen_gateway):
    base = {"model": "default", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4}
    for extra, name in [({"logprobs": True}, "logprobs"),
                        ({"frequency_penalty": 0.5}, "frequency_penalty"),
                        ({"some_new_field": 1}, "some_new_field"),
                        ({"response_format": {"type": "xml"}}, "xml"),
                        ({"tool_choice": "required"}, "tool_choice")]:
        r = httpx.post(qwen_gateway.url + "/v1/chat/completions", json={**base, **extra},
                       timeout=60)
        assert r.status_code == 400 and name in r.text, (extra, r.text)
    ok = httpx.post(qwen_gateway.url + "/v1/chat/completions",
                    json={**base, "user": "u1", "logprobs": False, "frequency_penalty": 0},
                    timeout=120)
    assert ok.status_code == 200


def test_tools_on_a_model_without_tool_format_get_a_400(gw_tools_smol):
    r = httpx.post(gw_tools_smol + "/v1/chat/completions", json={
        "model": "default", "messages": [{"role": "user", "content": "hi"}], "tools": [ADD],
        "stream": True}, timeout=60)
    assert r.status_code == 400 and "does not support tool calling" in r.text


@pytest.fixture(scope="module")
def gw_tools_smol(engine, tmp_path_factory):
    from ctxcache.semantic import TransformerEmbedder
    from tests.test_service import Server, make_gateway

    from ctxcache.service.app import create_app

    srv = Server(create_app(gateway=make_gateway(tmp_path_factory.mktemp("smol"), engine,
                                                 TransformerEmbedder())))
    yield srv.url
    srv.stop()
