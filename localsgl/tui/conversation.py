"""A chat conversation as plain data: its messages, system text and model, and its
Markdown / JSON exports. No Textual here, so the store and the tests use it directly."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

TITLE_CHARS = 60


@dataclass
class ChatMessage:
    role: str  # "user" | "assistant"
    content: str
    finish_reason: str | None = None  # an answer's: "stop" | "length" | "abort" | None while streaming
    model: str | None = None  # the model that wrote an answer
    created: float = field(default_factory=time.time)


@dataclass
class Conversation:
    model: str
    system: str | None = None
    messages: list[ChatMessage] = field(default_factory=list)
    id: int | None = None  # the store's row id, None until saved
    title: str = ""
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)

    def add(self, role: str, content: str, **kw) -> ChatMessage:
        msg = ChatMessage(role, content, **kw)
        self.messages.append(msg)
        if not self.title and role == "user":
            self.title = title_of(content)
        self.updated = msg.created
        return msg

    def engine_messages(self) -> list[dict]:
        """The messages the model sees: the system text first, then every turn."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [{"role": m.role, "content": m.content} for m in self.messages if m.content or m.role == "user"]

    def last(self, role: str) -> ChatMessage | None:
        for m in reversed(self.messages):
            if m.role == role:
                return m
        return None

    def drop_after_last_user(self) -> ChatMessage | None:
        """Remove the answers after the last user message; return that message."""
        while self.messages and self.messages[-1].role != "user":
            self.messages.pop()
        return self.messages[-1] if self.messages else None

    # ------------------------------------------------------------------ exports
    def to_markdown(self) -> str:
        lines = [f"# {self.title or 'Chat'}", "", f"*model: {self.model}*", ""]
        if self.system:
            lines += ["## System", "", self.system, ""]
        for m in self.messages:
            head = "You" if m.role == "user" else f"Assistant ({m.model or self.model})"
            if m.finish_reason == "abort":
                head += " (stopped)"
            lines += [f"## {head}", "", m.content, ""]
        return "\n".join(lines).rstrip() + "\n"

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "title": self.title,
            "model": self.model,
            "system": self.system,
            "created": self.created,
            "updated": self.updated,
            "messages": [asdict(m) for m in self.messages],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Conversation":
        msgs = [ChatMessage(**m) for m in d.get("messages", [])]
        return cls(model=d["model"], system=d.get("system"), messages=msgs, id=d.get("id"), title=d.get("title", ""),
                   created=d.get("created", time.time()), updated=d.get("updated", time.time()))

    def save_as(self, path: str | Path) -> Path:
        """Write the conversation to ``path``: JSON for a .json name, Markdown otherwise."""
        path = Path(path).expanduser()
        if path.suffix.lower() == ".json":
            text = json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"
        else:
            text = self.to_markdown()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return path


def title_of(text: str) -> str:
    """A conversation's title: the first line of its first message, shortened."""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return line if len(line) <= TITLE_CHARS else line[: TITLE_CHARS - 1].rstrip() + "…"
