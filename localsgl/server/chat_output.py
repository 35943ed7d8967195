"""What a chat choice's generated text becomes in the response: ``reasoning_content``,
``content`` and ``tool_calls``, whole (``message``) or as stream deltas (``feed``/``flush``).

The text goes through the reasoning split first (engine/reasoning.py; models that think in
tags), then, when tools are in use, through the tool call parser (tool_calls.py).  Without
either, text passes through unchanged.
"""
from __future__ import annotations

from localsgl.engine.reasoning import ReasoningParser

from .tool_calls import Tool, ToolCallParser, ToolFormat


class ChatOutput:
    def __init__(self, reasoning_tags: tuple[str, str] | None = None, inside_reasoning: bool = False,
                 fmt: ToolFormat | None = None, tools: list[Tool] | None = None):
        self.reasoning = ReasoningParser(reasoning_tags, inside_reasoning) if reasoning_tags else None
        self.tools = ToolCallParser(fmt, tools or []) if fmt is not None else None
        self.num_calls = 0

    @property
    def active(self) -> bool:
        return self.reasoning is not None or self.tools is not None

    def feed(self, text: str) -> list[dict]:
        """Stream deltas (dicts for a chunk's ``delta``) for a piece of generated text."""
        if self.reasoning is None:
            return self._answer(text, final=False)
        reasoning, answer = self.reasoning.feed(text)
        out = [{"reasoning_content": reasoning}] if reasoning else []
        return out + self._answer(answer, final=False)

    def flush(self) -> list[dict]:
        """The deltas still held back, at the end of the choice."""
        out: list[dict] = []
        answer = ""
        if self.reasoning is not None:
            reasoning, answer = self.reasoning.flush()
            if reasoning:
                out.append({"reasoning_content": reasoning})
        return out + self._answer(answer, final=True)

    def _answer(self, text: str, final: bool) -> list[dict]:
        if self.tools is None:
            return [{"content": text}] if text else []
        events = self.tools.feed(text) if text else []
        if final:
            events += self.tools.flush()
        out = []
        for kind, value in events:
            if kind == "content":
                if value:
                    out.append({"content": value})
            else:
                out.append({"tool_calls": [{"index": self.num_calls, **value}]})
                self.num_calls += 1
        return out

    def finish_reason(self, reason: str | None) -> str | None:
        """"tool_calls" for a choice that stopped after calling tools."""
        return "tool_calls" if self.num_calls and reason == "stop" else reason

    def message(self, text: str) -> dict:
        """The whole choice as a chat message's fields (content, tool_calls, reasoning_content)."""
        deltas = self.feed(text) + self.flush()
        content = "".join(d.get("content", "") for d in deltas)
        reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
        calls = [{k: v for k, v in d["tool_calls"][0].items() if k != "index"} for d in deltas if "tool_calls" in d]
        msg: dict = {"content": None if calls and not content.strip() else content}
        if calls:
            msg["tool_calls"] = calls
        if reasoning:
            msg["reasoning_content"] = reasoning
        return msg
