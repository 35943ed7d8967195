"""The model screen: the local models (size, format, source), switching to one (Enter),
pulling one from the hub with a progress bar (p), deleting one after a confirmation (d).
The store calls block, so they run in worker threads."""
from __future__ import annotations

from textual import work
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Input, Label, ProgressBar

from ..config import format_size
from . import model_catalog
from .confirm_screen import ConfirmScreen


class ModelScreen(Screen[str | None]):
    """Dismissed with the name of the model to switch to, or None."""

    BINDINGS = [
        Binding("escape", "close", "Back"),
        Binding("enter", "use", "Use", priority=False),
        Binding("p", "pull", "Pull"),
        Binding("d,delete", "delete", "Delete"),
        Binding("r", "refresh", "Refresh"),
    ]

    def __init__(self, current: str):
        super().__init__()
        self.current = current
        self.rows: list[model_catalog.ModelRow] = []

    def compose(self):
        yield Label(f"Models (in use: {self.current})", id="models-title", markup=False)
        yield DataTable(id="models", cursor_type="row", zebra_stripes=True)
        with Horizontal(id="pull-row"):
            yield Input(placeholder="org/repo[:QUANT][@REVISION], Enter pulls, Esc cancels", id="pull-spec")
        yield ProgressBar(id="pull-progress", show_eta=True)
        yield Label("", id="pull-status", markup=False)
        yield Footer(compact=True, show_command_palette=False)

    def on_mount(self) -> None:
        table = self.query_one("#models", DataTable)
        table.add_columns("", "name", "format", "size", "params", "source", "last used")
        self.query_one("#pull-row").display = False
        self.query_one("#pull-progress").display = False
        table.focus()
        self.action_refresh()

    # ------------------------------------------------------------------ listing
    @work(thread=True, exclusive=True, group="list")
    def action_refresh(self) -> None:
        try:
            rows = model_catalog.local_models()
        except Exception as e:  # noqa: BLE001 - shown on the screen
            self.app.call_from_thread(self._status, f"cannot list models: {e}")
            return
        self.app.call_from_thread(self._fill, rows)

    def _fill(self, rows: list[model_catalog.ModelRow]) -> None:
        from ..store.manage import describe_last_used, format_params

        self.rows = rows
        table = self.query_one("#models", DataTable)
        table.clear()
        for r in rows:
            mark = "●" if r.name == self.current else ""
            table.add_row(mark, r.name, r.format, format_size(r.size_bytes), format_params(r.params), r.source,
                          describe_last_used(r.last_used), key=r.name)
        if not rows:
            self._status("no local models: press p to pull one")

    def _status(self, text: str) -> None:
        self.query_one("#pull-status", Label).update(text)

    def selected(self) -> model_catalog.ModelRow | None:
        table = self.query_one("#models", DataTable)
        if not self.rows or table.cursor_row is None or table.cursor_row >= len(self.rows):
            return None
        return self.rows[table.cursor_row]

    # ------------------------------------------------------------------ actions
    def action_close(self) -> None:
        row = self.query_one("#pull-row")
        if row.display:
            row.display = False
            self.query_one("#models").focus()
            return
        self.dismiss(None)

    def action_use(self) -> None:
        if self.focused is not None and self.focused.id == "pull-spec":
            return  # Enter in the pull box submits it
        row = self.selected()
        if row is not None:
            self.dismiss(row.name)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.action_use()

    def action_pull(self) -> None:
        self.query_one("#pull-row").display = True
        self.query_one("#pull-spec", Input).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        spec = event.value.strip()
        if not spec:
            return
        event.input.value = ""
        self.query_one("#pull-row").display = False
        bar = self.query_one("#pull-progress", ProgressBar)
        bar.update(total=None, progress=0)
        bar.display = True
        self._status(f"pulling {spec}…")
        self.query_one("#models").focus()
        self._pull(spec)

    @work(thread=True, exclusive=True, group="pull")
    def _pull(self, spec: str) -> None:
        def progress(p) -> None:
            self.app.call_from_thread(self._show_progress, p)

        try:
            name = model_catalog.pull_model(spec, progress)
        except Exception as e:  # noqa: BLE001 - shown on the screen
            self.app.call_from_thread(self._pull_done, None, f"pull failed: {e}")
            return
        self.app.call_from_thread(self._pull_done, name, f"pulled {name}: Enter switches to it")

    def _show_progress(self, p) -> None:
        frac, file = model_catalog.progress_fraction(p)
        bar = self.query_one("#pull-progress", ProgressBar)
        if frac is None:
            bar.update(total=None)
        else:
            bar.update(total=1000, progress=int(frac * 1000))
        if file:
            self._status(f"pulling {file}")

    def _pull_done(self, name: str | None, message: str) -> None:
        self.query_one("#pull-progress").display = False
        self._status(message)
        if name is not None:
            self.action_refresh()

    def action_delete(self) -> None:
        row = self.selected()
        if row is None:
            return
        if row.name == self.current:
            self._status(f"{row.name} is in use; switch to another model first")
            return
        size = format_size(row.size_bytes)

        def answered(yes: bool | None) -> None:
            if yes:
                self._remove(row.name)

        self.app.push_screen(ConfirmScreen(f"Delete {row.name} ({size}) from disk?", yes="Delete"), answered)

    @work(thread=True, exclusive=True, group="remove")
    def _remove(self, name: str) -> None:
        try:
            freed = model_catalog.remove_model(name)
        except Exception as e:  # noqa: BLE001 - shown on the screen
            self.app.call_from_thread(self._status, f"cannot delete {name}: {e}")
            return
        self.app.call_from_thread(self._status, f"deleted {name}, freed {format_size(freed)}")
        self.app.call_from_thread(self.action_refresh)
