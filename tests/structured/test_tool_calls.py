"""Tool calling (server/tool_calls.py): the formats' grammars and parsers on their own, then
the official openai client against a live `localsgl serve` of the embedded model — named
and required choices with three tools of different schemas, streamed and not; every call's
arguments validate; unparseable output comes back as text, never a 500."""
from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import jsonschema
import pytest

from localsgl.server.tool_calls import (
    ToolError,
    ToolFormat,
    ToolCallParser,
    parse_tool_calls,
    parse_tool_choice,
    parse_tools,
    render_messages,
)

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                        "unit": {"enum": ["celsius", "fahrenheit"]}},
                       "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "add_numbers", "description": "Add integers",
        "parameters": {"type": "object", "properties": {"values": {"type": "array", "items": {
            "type": "integer", "minimum": -1000, "maximum": 1000}, "minItems": 2, "maxItems": 4}},
                       "required": ["values"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "set_alarm", "description": "Set an alarm",
        "parameters": {"type": "object", "properties": {"time": {"type": "string", "pattern": "^[0-2][0-9]:[0-5][0-9]$"},
                                                        "repeat": {"type": "boolean"}},
                       "required": ["time"], "additionalProperties": False}}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
SAMPLES = {
    "hermes": ('<tool_call>\n{"name": "add_numbers", "arguments": {"values": [1, 2]}}\n</tool_call>\n'
               '<tool_call>\n{"name": "set_alarm", "arguments": {"time": "07:30"}}\n</tool_call>'),
    "llama3": '{"name": "add_numbers", "parameters": {"values": [1, 2]}}; {"name": "set_alarm", "parameters": {"time": "07:30"}}',
    "mistral": '[TOOL_CALLS][{"name": "add_numbers", "arguments": {"values": [1, 2]}}, '
               '{"name": "set_alarm", "arguments": {"time": "07:30"}}]',
}
ARGS = {"hermes": "arguments", "llama3": "parameters", "mistral": "arguments"}


def validate_calls(calls):
    for c in calls:
        name = c["function"]["name"] if isinstance(c, dict) else c.function.name
        args = c["function"]["arguments"] if isinstance(c, dict) else c.function.arguments
        jsonschema.validate(json.loads(args), SCHEMAS[name])


# ------------------------------------------------------------------------------- parts
def test_tools_and_choice_checks():
    tools = parse_tools(TOOLS)
    assert [t.name for t in tools] == ["get_weather", "add_numbers", "set_alarm"]
    for bad in ([{"type": "retrieval"}], [{"type": "function", "function": {"name": "has space"}}],
                [TOOLS[0], TOOLS[0]], [{"type": "function", "function": {"name": "f", "parameters": "x"}}]):
        with pytest.raises(ToolError):
            parse_tools(bad)
    assert parse_tool_choice(None, tools) == "auto" and parse_tool_choice(None, []) == "none"
    assert parse_tool_choice({"type": "function", "function": {"name": "set_alarm"}}, tools) == "set_alarm"
    for bad in ("sometimes", {"type": "function", "function": {"name": "nope"}}):
        with pytest.raises(ToolError) as e:
            parse_tool_choice(bad, tools)
        assert e.value.param == "tool_choice"


@pytest.mark.parametrize("fmt", ["hermes", "llama3", "mistral"])
def test_grammars_accept_the_native_format(backend, tokenizer, fmt):
    import llguidance

    tools = parse_tools(TOOLS)
    f = ToolFormat(fmt, ARGS[fmt])

    def accepts(grammar, text):
        m = llguidance.LLMatcher(backend.ll_tokenizer, llguidance.LLMatcher.grammar_from_lark(grammar))
        assert not m.is_error(), m.get_error()
        ids = tokenizer.encode(text, add_special_tokens=False)
        return m.try_consume_tokens(ids) == len(ids) and m.is_accepting()

    two = SAMPLES[fmt]
    if fmt == "hermes":
        one = two[:two.index("</tool_call>") + len("</tool_call>")]
    else:
        one = two.split(";")[0] if fmt == "llama3" else two.split(", {")[0] + "]"
    assert accepts(f.grammar(tools, "auto", True), two)
    assert accepts(f.grammar(tools, "auto", True), "Just an answer.")
    assert accepts(f.grammar(tools, "auto", False), one) and not accepts(f.grammar(tools, "auto", False), two)
    assert accepts(f.grammar(tools, "required", True), two)
    assert not accepts(f.grammar(tools, "required", True), "Just an answer.")
    assert accepts(f.grammar(tools, "add_numbers", True), one)
    assert not accepts(f.grammar(tools, "set_alarm", True), one)
    bad_args = one.replace("[1, 2]", '"two"')
    assert not accepts(f.grammar(tools, "auto", True), bad_args)


@pytest.mark.parametrize("fmt", ["hermes", "llama3", "mistral"])
def test_parser_whole_and_streamed(fmt):
    tools = parse_tools(TOOLS)
    f = ToolFormat(fmt, ARGS[fmt])
    content, calls = parse_tool_calls(SAMPLES[fmt], f, tools)
    assert content is None and [c["function"]["name"] for c in calls] == ["add_numbers", "set_alarm"]
    validate_calls(calls)
    assert parse_tool_calls("No calls here.", f, tools) == ("No calls here.", [])
    rng = random.Random(fmt)
    for _ in range(25):
        p = ToolCallParser(f, tools)
        events, text, i = [], SAMPLES[fmt], 0
        while i < len(text):
            n = rng.randint(1, 7)
            events += p.feed(text[i:i + n])
            i += n
        events += p.flush()
        assert [e[1]["function"]["name"] for e in events if e[0] == "call"] == ["add_numbers", "set_alarm"]
        assert not "".join(e[1] for e in events if e[0] == "content").strip()


@pytest.mark.parametrize("fmt, text", [
    ("hermes", '<tool_call>\n{"name": "add_numbers", "arguments": {"values": [1, 2\n</tool_call>'),
    ("hermes", '<tool_call>\n{"name": "no_such_tool", "arguments": {}}\n</tool_call>'),
    ("hermes", "<tool_call>\n{\"name\": \"add_numb"),  # cut by max_tokens
    ("llama3", '{"name": "add_numbers", "parameters": [1]}'),
    ("mistral", "[TOOL_CALLS][{oops}]"),
])
def test_unparseable_calls_come_back_as_text(fmt, text):
    content, calls = parse_tool_calls(text, ToolFormat(fmt, ARGS[fmt]), parse_tools(TOOLS))
    assert calls == [] and content == text


def test_nesting_past_the_recursion_limit_is_text_not_an_error():
    """A call nested deeper than Python's json can read is returned as text; such arguments in
    an earlier assistant message are kept as their text."""
    tools = parse_tools(TOOLS)
    deep = "[" * 5000 + "]" * 5000
    text = f'<tool_call>\n{{"name": "add_numbers", "arguments": {{"values": {deep}}}}}\n</tool_call>'
    assert parse_tool_calls(text, ToolFormat("hermes", "arguments"), tools) == (text, [])
    messages = [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "add_numbers", "arguments": deep}}]}]
    assert deep in render_messages(messages, tools, native=False)[1]["content"]
    assert render_messages(messages, tools, native=True)[0]["tool_calls"][0]["function"]["arguments"] == deep


def test_history_rendering_without_native_tools():
    tools = parse_tools(TOOLS)
    messages = [
        {"role": "user", "content": "Add 1 and 2"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "add_numbers", "arguments": '{"values": [1, 2]}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "3"},
    ]
    plain = render_messages(messages, tools, native=False)
    assert plain[0]["role"] == "system" and "<tools>" in plain[0]["content"] and "set_alarm" in plain[0]["content"]
    assert '<tool_call>\n{"name": "add_numbers", "arguments": {"values": [1, 2]}}\n</tool_call>' in plain[2]["content"]
    assert plain[3] == {"role": "user", "content": "<tool_response>\n3\n</tool_response>"}
    native = render_messages(messages, tools, native=True)
    assert native[1]["tool_calls"][0]["function"]["arguments"] == {"values": [1, 2]}  # objects, as templates expect
    assert native[1]["content"] == "" and native[2]["role"] == "tool"


# ------------------------------------------------------------------------------- live server
def _server_module():
    path = Path(__file__).resolve().parents[1] / "server" / "conftest.py"
    spec = importlib.util.spec_from_file_location("localsgl_server_test_support", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def server():
    support = _server_module()
    srv = support.LiveServer(support.real_cfg(), startup_timeout=300.0)
    yield srv
    assert srv.stop() == 0, "".join(srv.lines[-30:])


MSG = [{"role": "user", "content": "Please add 12 and 30, then set an alarm for 07:15."}]
# MSG after the model called add_numbers and the tool answered
MSG_WITH_RESULT = MSG + [
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "add_numbers", "arguments": '{"values": [12, 30]}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "42"},
]


def _stream_calls(client, **kw):
    calls: dict[int, dict] = {}
    finish, content = None, ""
    for ch in client.chat.completions.create(stream=True, **kw):
        for c in ch.choices:
            content += c.delta.content or ""
            for tc in c.delta.tool_calls or []:
                cur = calls.setdefault(tc.index, {"id": None, "function": {"name": "", "arguments": ""}})
                cur["id"] = tc.id or cur["id"]
                if tc.function is not None:
                    cur["function"]["name"] += tc.function.name or ""
                    cur["function"]["arguments"] += tc.function.arguments or ""
            finish = c.finish_reason or finish
    return [calls[i] for i in sorted(calls)], content, finish


@pytest.mark.parametrize("name", [t["function"]["name"] for t in TOOLS])
def test_named_choice(server, name):
    c = server.openai()
    kw = dict(model=server.model, messages=MSG, tools=TOOLS, max_tokens=80, temperature=0,
              tool_choice={"type": "function", "function": {"name": name}})
    r = c.chat.completions.create(**kw)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls", ch
    assert [x.function.name for x in ch.message.tool_calls] == [name]
    assert ch.message.tool_calls[0].id and ch.message.tool_calls[0].type == "function"
    validate_calls(ch.message.tool_calls)
    if name == "add_numbers":  # streamed: the same call, as tool_calls deltas
        calls, content, finish = _stream_calls(c, **kw)
        assert finish == "tool_calls" and not content.strip()
        assert [x["function"]["name"] for x in calls] == [name]
        assert calls[0]["function"]["arguments"] == ch.message.tool_calls[0].function.arguments
        validate_calls(calls)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_required_choice(server, temperature):
    c = server.openai()
    kw = dict(model=server.model, messages=MSG, tools=TOOLS, max_tokens=120, temperature=temperature, seed=4,
              tool_choice="required", parallel_tool_calls=False)
    r = c.chat.completions.create(**kw)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls", ch
    assert len(ch.message.tool_calls) == 1
    validate_calls(ch.message.tool_calls)
    if temperature == 0.0:
        calls, _, finish = _stream_calls(c, **kw)
        assert finish == "tool_calls" and len(calls) == 1
        assert calls[0]["function"] == ch.message.tool_calls[0].function.model_dump()


def test_auto_choice_and_tool_results_never_fail(server):
    c = server.openai()
    for messages in (MSG, MSG_WITH_RESULT):
        r = c.chat.completions.create(model=server.model, messages=messages, tools=TOOLS, max_tokens=24,
                                      temperature=0)
        ch = r.choices[0]
        assert ch.finish_reason in ("stop", "length", "tool_calls")
        if ch.message.tool_calls:
            validate_calls(ch.message.tool_calls)
        else:
            assert isinstance(ch.message.content, str)


def test_call_cut_short_comes_back_as_text(server):
    """max_tokens cuts a required call: the answer does not parse, so it is the content
    (finish_reason "length"), streamed the same way; never an error."""
    c = server.openai()
    kw = dict(model=server.model, messages=MSG, tools=TOOLS, max_tokens=4, temperature=0, tool_choice="required")
    ch = c.chat.completions.create(**kw).choices[0]
    assert ch.finish_reason == "length" and not ch.message.tool_calls
    assert ch.message.content and "<tool" in ch.message.content, ch.message.content
    calls, content, finish = _stream_calls(c, **kw)
    assert (calls, content, finish) == ([], ch.message.content, "length")


def test_none_choice_answers_in_text(server):
    """tool_choice "none": no call grammar and no calls, also after a tool result."""
    c = server.openai()
    for messages in (MSG, MSG_WITH_RESULT):
        ch = c.chat.completions.create(model=server.model, messages=messages, tools=TOOLS, tool_choice="none",
                                       max_tokens=6, temperature=0).choices[0]
        assert ch.finish_reason in ("stop", "length") and not ch.message.tool_calls
        assert isinstance(ch.message.content, str)


def test_response_format_through_the_client(server):
    c = server.openai()
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 15},
                                               "rain": {"type": "boolean"}},
              "required": ["city", "rain"], "additionalProperties": False}
    kw = dict(model=server.model, messages=[{"role": "user", "content": "Weather in Oslo as JSON"}], max_tokens=30,
              temperature=0, response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": schema}},
              extra_body={"chat_template_kwargs": {"enable_thinking": False}})  # passed to the template
    r = c.chat.completions.create(**kw)
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    text = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(stream=True, **kw)
                   if ch.choices)
    assert text == r.choices[0].message.content
    r = c.completions.create(model=server.model, prompt="An object:", max_tokens=12, temperature=0,
                             extra_body={"response_format": {"type": "json_object"}})
    assert r.choices[0].text.startswith("{")
    r = c.completions.create(model=server.model, prompt="A date:", max_tokens=20, temperature=0,
                             extra_body={"regex": "20[0-9]{2}-[01][0-9]-[0-3][0-9]"})
    assert len(r.choices[0].text) == 10


@pytest.mark.parametrize("body, param", [
    ({"tools": [{"type": "retrieval"}]}, "tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "missing"}}}, "tool_choice"),
    ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}],
      "tool_choice": "required"}, "tools"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format"),
    ({"regex": "(("}, "regex"),
    ({"grammar": "start: nothing"}, "grammar"),
    ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
])
def test_bad_structured_requests_are_400(server, body, param):
    with server.client() as c:
        r = c.post("/v1/chat/completions", json={"model": server.model, "messages": MSG, "max_tokens": 5, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()
