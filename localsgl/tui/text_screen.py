"""The conversation as text in a read-only editor, for selecting with the keyboard:
the arrows move, shift+arrows select, ctrl+c copies, Esc closes."""
from __future__ import annotations

from textual.binding import Binding
from textual.screen import ModalScreen
from textual.widgets import Label, TextArea


class TextScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape", "close", "Close")]

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def compose(self):
        yield Label("select with shift+arrows, ctrl+c copies, Esc closes", id="text-hint")
        yield TextArea(self.text, read_only=True, soft_wrap=True, id="transcript")

    def on_mount(self) -> None:
        area = self.query_one(TextArea)
        area.focus()
        area.move_cursor(area.document.end)

    def action_close(self) -> None:
        self.dismiss(None)
