"""The message box: multi-line, Enter sends, Shift+Enter / Ctrl+J add a line, Up and
Down on the first / last line walk through the messages sent before."""
from __future__ import annotations

from textual import events
from textual.binding import Binding
from textual.message import Message
from textual.widgets import TextArea

from .keys import KEY_ACTIONS, effective_keys


def _binding(bid: str, action: str, priority: bool = False, show: bool = False) -> Binding:
    a = KEY_ACTIONS[bid]
    return Binding(a.key, action, a.short or a.description, id=bid, priority=priority, show=show)


class PromptInput(TextArea):
    """Its send and newline keys are ordinary (not priority) bindings, and the editor lets
    those keys pass: a key then runs after the characters typed before it, which a
    priority binding would overtake (text typed and Enter pressed in one burst)."""

    BINDINGS = [
        _binding("send", "send", show=True),
        _binding("newline", "newline"),
        _binding("history_previous", "history_previous"),
        _binding("history_next", "history_next"),
    ]

    class Submitted(Message):
        def __init__(self, text: str):
            super().__init__()
            self.text = text

    def __init__(self, **kw):
        super().__init__(soft_wrap=True, show_line_numbers=False, tab_behavior="focus",
                         placeholder="Message (Enter sends, /help for commands)", **kw)
        self.sent: list[str] = []
        self._history_at: int | None = None  # index into history while walking it
        self._draft = ""

    def _own_keys(self) -> set[str]:
        keys = effective_keys(getattr(self.app, "keymap", {}) or {})
        return {k.strip().lower() for bid in ("send", "newline") for k in keys[bid].split(",")}

    async def _on_key(self, event: events.Key) -> None:
        if event.key in self._own_keys() or any(a in self._own_keys() for a in event.aliases):
            event.prevent_default()  # not typed into the box: it bubbles up to the binding
            return
        await super()._on_key(event)

    def action_send(self) -> None:
        text = self.text
        if not text.strip():
            return
        if not self.sent or self.sent[-1] != text:
            self.sent.append(text)
        self._history_at = None
        self.clear()
        self.post_message(self.Submitted(text))

    def action_newline(self) -> None:
        self.insert("\n")

    def action_history_previous(self) -> None:
        if self.cursor_location[0] != 0 or not self.sent:
            self.action_cursor_up()
            return
        if self._history_at is None:
            self._draft = self.text
            self._history_at = len(self.sent)
        if self._history_at > 0:
            self._history_at -= 1
            self._show(self.sent[self._history_at])

    def action_history_next(self) -> None:
        if self.cursor_location[0] != self.document.line_count - 1 or self._history_at is None:
            self.action_cursor_down()
            return
        self._history_at += 1
        if self._history_at >= len(self.sent):
            self._history_at = None
            self._show(self._draft)
        else:
            self._show(self.sent[self._history_at])

    def _show(self, text: str) -> None:
        self.load_text(text)
        self.move_cursor(self.document.end)

    def set_text(self, text: str) -> None:
        """Put ``text`` in the box for editing, the cursor at its end."""
        self._history_at = None
        self._show(text)
        self.focus()
