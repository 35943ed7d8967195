"""The message box: multi-line, Enter sends, Shift+Enter / Ctrl+J add a line, Up and
Down on the first / last line walk through the messages sent before."""
from __future__ import annotations

from textual.binding import Binding
from textual.message import Message
from textual.widgets import TextArea

from .keys import KEY_ACTIONS


def _binding(bid: str, action: str, priority: bool = False, show: bool = False) -> Binding:
    a = KEY_ACTIONS[bid]
    return Binding(a.key, action, a.short or a.description, id=bid, priority=priority, show=show)


class PromptInput(TextArea):
    BINDINGS = [
        _binding("send", "send", priority=True, show=True),
        _binding("newline", "newline", priority=True),
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
