"""The /help text (commands and the key bindings in force) over the chat; Esc closes it."""
from __future__ import annotations

from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,f1", "dismiss", "Close")]

    def __init__(self, markdown: str):
        super().__init__()
        self.markdown = markdown

    def compose(self):
        with VerticalScroll(id="help"):
            yield Markdown(self.markdown)

    def action_dismiss(self) -> None:
        self.dismiss(None)
