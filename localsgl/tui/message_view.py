"""One message in the conversation view: a header line (who, and the answer's figures)
over its body. Answers render as Markdown that grows by appended deltas while they
stream; a click on a code block copies it."""
from __future__ import annotations

import time
from typing import Callable

from textual.await_complete import AwaitComplete
from textual.containers import Vertical
from textual.widgets import Label, Markdown, Static
from textual.widgets.markdown import MarkdownFence, MarkdownStream

from .conversation import ChatMessage


class CopyableFence(MarkdownFence):
    """A highlighted code block; clicking it copies its code (unless text is selected)."""

    def on_mount(self) -> None:
        self.tooltip = "click to copy"

    def on_click(self) -> None:
        if self.screen.get_selected_text():
            return  # the click ends a mouse selection; ctrl+c copies that
        self.app.copy_to_clipboard(self.code)
        self.app.notify("code block copied", timeout=2)


class AnswerMarkdown(Markdown):
    """Markdown whose appends report how much of the source is on screen (for the
    streaming-cost measurement) through ``on_rendered(chars, perf_counter_time)``."""

    BLOCKS = {**Markdown.BLOCKS, "fence": CopyableFence, "code_block": CopyableFence}

    def __init__(self, markdown: str = "", on_rendered: Callable[[int, float], None] | None = None, **kw):
        super().__init__(markdown, **kw)
        self.on_rendered = on_rendered

    def append(self, markdown: str) -> AwaitComplete:
        appended = super().append(markdown)
        if self.on_rendered is None:
            return appended
        report = self.on_rendered

        async def then_report() -> None:
            await appended
            report(len(self.source), time.perf_counter())

        return AwaitComplete(then_report())

    def code_blocks(self) -> list[str]:
        return [f.code for f in self.query(CopyableFence)]


class MessageView(Vertical):
    """A user message, an answer, or a note from the app (errors, command replies)."""

    def __init__(self, message: ChatMessage | None, *, note: str | None = None, header: str = "",
                 on_rendered: Callable[[int, float], None] | None = None):
        role = "note" if message is None else message.role
        super().__init__(classes=f"message {role}")
        self.message = message
        self.note = note
        self.header = header
        self.on_rendered = on_rendered
        self._stream: MarkdownStream | None = None

    def compose(self):
        if self.header:
            yield Label(self.header, classes="header", markup=False)
        if self.message is None:
            yield Static(self.note or "", classes="body", markup=False)
        elif self.message.role == "assistant":
            yield AnswerMarkdown(self.message.content, on_rendered=self.on_rendered, classes="body")
        else:
            yield Static(self.message.content, classes="body", markup=False)

    # ------------------------------------------------------------------ streaming
    @property
    def markdown(self) -> AnswerMarkdown | None:
        found = self.query(AnswerMarkdown)
        return found.first() if found else None

    def start_stream(self) -> MarkdownStream:
        md = self.markdown
        assert md is not None, "only answers stream"
        self._stream = Markdown.get_stream(md)
        return self._stream

    async def end_stream(self) -> None:
        if self._stream is not None:
            stream, self._stream = self._stream, None
            await stream.stop()

    def set_header(self, text: str) -> None:
        self.header = text
        found = self.query(".header")
        if found:
            found.first(Label).update(text)

    def code_blocks(self) -> list[str]:
        md = self.markdown
        return md.code_blocks() if md is not None else []
