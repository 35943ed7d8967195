"""Tool calling on /v1/chat/completions: tools in, calls out, in the model family's own format.

Three native formats (``ToolFormat``), picked from the chat template:

* ``hermes`` — Qwen2.5/Qwen3 and ChatML templates: ``<tool_call>\\n{"name": …, "arguments":
  {…}}\\n</tool_call>``, one block per call;
* ``llama3`` — Llama 3.1+ JSON calls: ``{"name": …, "parameters": {…}}``, optionally after
  ``<|python_tag|>``, several separated by ``;``;
* ``mistral`` — ``[TOOL_CALLS][{"name": …, "arguments": {…}}, …]``.

A template that does not render tools gets them in a system message and the Hermes format
(``render_messages``).  The grammar (``ToolFormat.grammar``, a Lark grammar for the engine's
llguidance) leaves the output free until the model opens a call (a lazy trigger); from
there the call's name is one of the tools and its arguments follow that tool's JSON schema.
``required`` and a named function constrain from the first token.  ``ToolCallParser``
turns the text back into calls, streamed or not; anything that does not parse is returned
as text, never an error.
"""
from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass, field

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# JSON inside calls is written as the models were trained to write it (json.dumps' spacing)
_CALL_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class ToolError(ValueError):
    """A tools / tool_choice value the server cannot use (an HTTP 400)."""

    def __init__(self, message: str, param: str = "tools"):
        super().__init__(message)
        self.param = param


@dataclass
class Tool:
    name: str
    description: str | None
    parameters: dict

    def definition(self) -> dict:
        """The OpenAI shape, for the chat template."""
        fn = {"name": self.name, "parameters": self.parameters}
        if self.description:
            fn["description"] = self.description
        return {"type": "function", "function": fn}


def parse_tools(raw: list) -> list[Tool]:
    tools: list[Tool] = []
    for i, t in enumerate(raw):
        where = f"tools[{i}]"
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
            raise ToolError(f'{where} must be {{"type": "function", "function": {{...}}}}')
        fn = t["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ToolError(f"{where}.function.name must be 1-64 letters, digits, '_' or '-'")
        if any(x.name == name for x in tools):
            raise ToolError(f"{where}: the tool name {name!r} is used twice")
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise ToolError(f"{where}.function.parameters must be a JSON schema object")
        desc = fn.get("description")
        tools.append(Tool(name, desc if isinstance(desc, str) else None, params))
    return tools


def parse_tool_choice(choice, tools: list[Tool]) -> str:
    """"none" | "auto" | "required" | the name of the one tool to call."""
    if choice is None:
        return "auto" if tools else "none"
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise ToolError("tool_choice must be none, auto, required or a function", "tool_choice")
        if choice == "required" and not tools:
            raise ToolError("tool_choice is required but no tools are given", "tool_choice")
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if not any(t.name == name for t in tools):
            raise ToolError(f"tool_choice names {name!r}, which is not among the tools", "tool_choice")
        return name
    raise ToolError('tool_choice must be "none", "auto", "required" or {"type": "function", "function": '
                    '{"name": ...}}', "tool_choice")


# ---------------------------------------------------------------------------------- formats
@dataclass
class ToolFormat:
    name: str  # hermes | llama3 | mistral
    args_key: str  # the key the arguments go under in the model's JSON
    special: dict[str, int] = field(default_factory=dict)  # markers that are single special tokens -> ids

    @property
    def needs_special_tokens(self) -> bool:
        """Whether the markers must stay in the text (decoded with special tokens)."""
        return bool(self.special)

    def call_schema(self, tools: list[Tool]) -> dict:
        """One call's JSON: ``{"name": <one of tools>, <args_key>: <its parameters>}``."""
        options = [{
            "type": "object",
            "properties": {"name": {"const": t.name}, self.args_key: t.parameters},
            "required": ["name", self.args_key],
            "additionalProperties": False,
        } for t in tools]
        schema = options[0] if len(options) == 1 else {"anyOf": options}
        return {**schema, "x-guidance": _CALL_JSON}

    def _mark(self, text: str) -> str:
        """A marker in a Lark rule: its special token, or its text."""
        return f"<[{self.special[text]}]>" if text in self.special else json.dumps(text)

    def grammar(self, tools: list[Tool], choice: str, parallel: bool) -> str:
        """The Lark grammar of an answer under tool_choice ``choice`` ("auto", "required" or
        a tool's name)."""
        if choice not in ("auto", "required"):
            tools = [t for t in tools if t.name == choice]
            parallel = False
        body = f"body: %json {json.dumps(self.call_schema(tools))}\n"
        free = choice == "auto"
        text = "TEXT: /(.|\\n)*/\n"
        if self.name == "hermes":
            open_, close = "<tool_call>", "</tool_call>"
            more = f'more*\nmore: "\\n" {self._mark(open_)} "\\n" body "\\n" {self._mark(close)}\n' if parallel else "\n"
            first = f'"\\n" body "\\n" {self._mark(close)} '
            if not free:
                return f"start: {self._mark(open_)} {first}{more}{body}"
            if open_ in self.special:
                return f"start: TEXT | TEXT {self._mark(open_)} {first}{more}{body}{text}"
            return f"start: TEXT | head {first}{more}head[lazy]: TEXT {self._mark(open_)}\n{body}{text}"
        if self.name == "llama3":
            tag = "<|python_tag|>"
            lead = f"{self._mark(tag)}? " if tag in self.special else ""
            calls = f'{lead}body (";" " "? body)*' if parallel else f"{lead}body"
            if not free:
                return f"start: {calls}\n{body}"
            # a free answer may not start with "{" (that opens a call)
            return f"start: (ANSWER | {calls})?\nANSWER: /([^{{ \\n]|[ \\n]+[^{{ \\n])(.|\\n)*/\n{body}"
        # mistral: [TOOL_CALLS][{...}, ...]
        tag = "[TOOL_CALLS]"
        array = {"type": "array", "items": self.call_schema(tools), "minItems": 1, "x-guidance": _CALL_JSON}
        if not parallel:
            array["maxItems"] = 1
        calls = f"calls: %json {json.dumps(array)}\n"
        if not free:
            return f"start: {self._mark(tag)} calls\n{calls}"
        if tag in self.special:
            return f"start: TEXT | TEXT {self._mark(tag)} calls\n{calls}{text}"
        return f"start: TEXT | head calls\nhead[lazy]: TEXT {self._mark(tag)}\n{calls}{text}"


def detect_format(tokenizer, special_ids=None) -> ToolFormat:
    """The model family's tool call format, from its chat template (Hermes when unsure).
    ``special_ids(texts)`` says which markers are single special tokens (grammar.py's
    GrammarBackend.special_token_ids)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if "[TOOL_CALLS]" in template:
        fmt = ToolFormat("mistral", "arguments")
        markers = ["[TOOL_CALLS]"]
    elif "<|python_tag|>" in template or ("<|start_header_id|>" in template and "tools" in template):
        fmt = ToolFormat("llama3", "parameters")
        markers = ["<|python_tag|>"]
    else:
        fmt = ToolFormat("hermes", "arguments")
        markers = ["<tool_call>", "</tool_call>"]
    if special_ids is not None:
        fmt.special = dict(special_ids(markers))
    return fmt


def template_renders_tools(tokenizer) -> bool:
    template = getattr(tokenizer, "chat_template", None) or ""
    return "tools" in template


# ---------------------------------------------------------------------------------- prompts
def render_messages(messages: list[dict], tools: list[Tool], native: bool) -> list[dict]:
    """Messages for the chat template.  ``native``: the template renders tools, tool calls
    and tool results itself (arguments go in as objects, as templates expect).  Otherwise the
    tools are described in the system message and calls and results become Hermes text."""
    out = []
    for m in messages:
        m = dict(m)
        calls = m.get("tool_calls")
        if calls:
            if native:
                m["tool_calls"] = [_template_call(c) for c in calls]
                if m.get("content") is None:
                    m["content"] = ""
            else:
                del m["tool_calls"]
                blocks = [f"<tool_call>\n{json.dumps(_plain_call(c), ensure_ascii=False)}\n</tool_call>" for c in calls]
                m["content"] = "\n".join(([m["content"]] if m.get("content") else []) + blocks)
        if m.get("role") == "tool" and not native:
            m = {"role": "user", "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"}
        if m.get("content") is None:
            m["content"] = ""
        out.append(m)
    if tools and not native:
        system = _tools_system_text(tools)
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{system}".strip()}
        else:
            out.insert(0, {"role": "system", "content": system})
    return out


def _tools_system_text(tools: list[Tool]) -> str:
    listing = "\n".join(json.dumps(t.definition(), ensure_ascii=False) for t in tools)
    return (
        "You can call functions to help answer. The functions are described, one JSON per line, "
        f"between <tools> and </tools>:\n<tools>\n{listing}\n</tools>\n\n"
        "To call one, write a JSON object with its name and its arguments between <tool_call> and "
        "</tool_call>, like this:\n<tool_call>\n{\"name\": \"function_name\", \"arguments\": {\"arg\": \"value\"}}\n"
        "</tool_call>"
    )


def _arguments(call: dict):
    fn = call.get("function") if isinstance(call.get("function"), dict) else call
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            return json.loads(args)
        except (ValueError, RecursionError):  # kept as the text it is
            return args
    return args


def _plain_call(call: dict) -> dict:
    fn = call.get("function") if isinstance(call.get("function"), dict) else call
    return {"name": fn.get("name"), "arguments": _arguments(call)}


def _template_call(call: dict) -> dict:
    fn = call.get("function") if isinstance(call.get("function"), dict) else {}
    out = dict(call)
    out["function"] = {**fn, "arguments": _arguments(call)}
    return out


# ---------------------------------------------------------------------------------- parsing
def new_call_id(fmt: ToolFormat) -> str:
    if fmt.name == "mistral":  # Mistral's templates expect 9 letters and digits
        alphabet = string.ascii_letters + string.digits
        return "".join(secrets.choice(alphabet) for _ in range(9))
    return "call_" + secrets.token_hex(12)


class ToolCallParser:
    """Streamed answer text in; events out: ``("content", text)`` and ``("call", {"id",
    "type", "function": {"name", "arguments"}})``.  Text that may open a call is held back
    until it is decided; a call that does not parse (or names no tool) comes out as the
    text it was."""

    def __init__(self, fmt: ToolFormat, tools: list[Tool]):
        self.fmt = fmt
        self.names = {t.name for t in tools}
        self.buf = ""
        self.mode = "text"  # text | call (hermes: inside a block) | rest (llama3/mistral: all to the end)
        self.started = False  # any non-space text seen (llama3 calls open the answer)
        self.calls = 0

    def feed(self, text: str) -> list[tuple[str, object]]:
        self.buf += text
        out: list[tuple[str, object]] = []
        if self.fmt.name == "hermes":
            self._hermes(out, final=False)
        elif self.fmt.name == "llama3":
            self._llama(out, final=False)
        else:
            self._mistral(out, final=False)
        return out

    def flush(self) -> list[tuple[str, object]]:
        out: list[tuple[str, object]] = []
        if self.fmt.name == "hermes":
            self._hermes(out, final=True)
        elif self.fmt.name == "llama3":
            self._llama(out, final=True)
        else:
            self._mistral(out, final=True)
        if self.buf:
            out.append(("content", self.buf))
            self.buf = ""
        return _merge(out)

    # -- one call ---------------------------------------------------------------------
    def _call(self, obj) -> dict | None:
        if not isinstance(obj, dict) or obj.get("name") not in self.names:
            return None
        args = obj.get(self.fmt.args_key, obj.get("arguments", obj.get("parameters", {})))
        if not isinstance(args, dict):
            return None
        self.calls += 1
        return {"id": new_call_id(self.fmt), "type": "function",
                "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}}

    # -- formats ----------------------------------------------------------------------
    def _hermes(self, out, final: bool) -> None:
        open_, close = "<tool_call>", "</tool_call>"
        while self.buf:
            if self.mode == "text":
                i = self.buf.find(open_)
                if i >= 0:
                    before = self.buf[:i]
                    if before.strip():
                        out.append(("content", before))
                    self.buf = self.buf[i:]
                    self.mode = "call"
                    continue
                keep = 0 if final else _partial_suffix(self.buf, open_)
                text = self.buf[:len(self.buf) - keep]
                if text and (text.strip() or not self.calls):  # whitespace between calls is dropped
                    out.append(("content", text))
                self.buf = self.buf[len(self.buf) - keep:]
                return
            j = self.buf.find(close)
            if j < 0 and not final:
                return
            block = self.buf if j < 0 else self.buf[:j + len(close)]
            inner = block[len(open_): len(block) - (len(close) if j >= 0 else 0)]
            call = self._call(_loads(inner))
            out.append(("call", call) if call is not None else ("content", block))
            self.buf = "" if j < 0 else self.buf[j + len(close):]
            self.mode = "text"

    def _llama(self, out, final: bool) -> None:
        if self.mode == "text" and not self.started:
            s = self.buf.lstrip()
            if not s:
                return
            if s.startswith("<|python_tag|>") or s.startswith("{"):
                self.mode = "rest"
            elif "<|python_tag|>".startswith(s) and not final:
                return
            self.started = True
        if self.mode == "text":
            out.append(("content", self.buf))
            self.buf = ""
            return
        if not final:
            return
        body = self.buf.strip()
        if body.startswith("<|python_tag|>"):
            body = body[len("<|python_tag|>"):]
        calls = [self._call(_loads(part)) for part in _split_top_level(body, ";")]
        if calls and all(c is not None for c in calls):
            out.extend(("call", c) for c in calls)
            self.buf = ""
        else:
            self.calls -= sum(c is not None for c in calls)

    def _mistral(self, out, final: bool) -> None:
        tag = "[TOOL_CALLS]"
        if self.mode == "text":
            i = self.buf.find(tag)
            if i < 0:
                keep = 0 if final else _partial_suffix(self.buf, tag)
                if len(self.buf) > keep:
                    out.append(("content", self.buf[:len(self.buf) - keep]))
                self.buf = self.buf[len(self.buf) - keep:]
                return
            if self.buf[:i].strip():
                out.append(("content", self.buf[:i]))
            self.buf = self.buf[i:]
            self.mode = "rest"
        if not final:
            return
        arr = _loads(self.buf[len(tag):])
        calls = [self._call(x) for x in arr] if isinstance(arr, list) and arr else []
        if calls and all(c is not None for c in calls):
            out.extend(("call", c) for c in calls)
            self.buf = ""
        else:
            self.calls -= sum(c is not None for c in calls)


def parse_tool_calls(text: str, fmt: ToolFormat, tools: list[Tool]) -> tuple[str | None, list[dict]]:
    """A whole answer's (content, calls); content None when the answer is only calls."""
    p = ToolCallParser(fmt, tools)
    events = p.feed(text) + p.flush()
    content = "".join(x for k, x in events if k == "content")
    calls = [x for k, x in events if k == "call"]
    if calls and not content.strip():
        return None, calls
    return content, calls


def _loads(s: str):
    try:
        return json.loads(s.strip())
    except (ValueError, RecursionError):  # nested past Python's recursion limit: not a call either
        return None


def _split_top_level(s: str, sep: str) -> list[str]:
    """s cut at ``sep`` outside JSON strings and brackets."""
    parts, depth, start, in_str, esc = [], 0, 0, False, False
    for i, ch in enumerate(s):
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(s[start:i])
            start = i + 1
    parts.append(s[start:])
    return [p for p in parts if p.strip()]


def _partial_suffix(buf: str, tag: str) -> int:
    for n in range(min(len(tag) - 1, len(buf)), 0, -1):
        if tag.startswith(buf[-n:]):
            return n
    return 0


def _merge(events: list) -> list:
    out: list = []
    for k, x in events:
        if k == "content" and out and out[-1][0] == "content":
            out[-1] = ("content", out[-1][1] + x)
        else:
            out.append((k, x))
    return out
