"""The saved conversations, newest first: Enter reopens one, d deletes one."""
from __future__ import annotations

import sqlite3
import time

from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Label

from .confirm_screen import ConfirmScreen
from .history import ChatHistory, ConversationSummary, NoHistory


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


class SessionsScreen(Screen[int | None]):
    """Dismissed with the id of the conversation to open, or None."""

    BINDINGS = [
        Binding("escape", "close", "Back"),
        Binding("d,delete", "delete", "Delete"),
    ]

    def __init__(self, history: ChatHistory | NoHistory, current: int | None):
        super().__init__()
        self.history = history
        self.current = current
        self.rows: list[ConversationSummary] = []

    def compose(self):
        yield Label("Conversations", id="sessions-title")
        yield DataTable(id="sessions", cursor_type="row", zebra_stripes=True)
        yield Footer(compact=True, show_command_palette=False)

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns("", "updated", "title", "model", "msgs")
        self.refill()
        table.focus()

    def refill(self) -> None:
        try:
            self.rows = self.history.summaries()
        except sqlite3.Error as e:  # locked by another chat for longer than the store waits
            self.rows = []
            self.app.notify(f"cannot list the saved conversations: {e}", severity="error")
        table = self.query_one(DataTable)
        table.clear()
        for s in self.rows:
            table.add_row("●" if s.id == self.current else "", _when(s.updated), s.title or "(empty)",
                          s.model.rsplit("/", 1)[-1], str(s.messages), key=str(s.id))

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        if self.rows:
            self.dismiss(self.rows[event.cursor_row].id)

    def action_close(self) -> None:
        self.dismiss(None)

    def action_delete(self) -> None:
        table = self.query_one(DataTable)
        if not self.rows:
            return
        s = self.rows[table.cursor_row]

        def answered(yes: bool | None) -> None:
            if yes:
                try:
                    self.history.delete(s.id)
                except sqlite3.Error as e:
                    self.app.notify(f"cannot delete the conversation: {e}", severity="error")
                self.refill()

        self.app.push_screen(ConfirmScreen(f"Delete the conversation {s.title or s.id!r}?", yes="Delete"), answered)
