"""One message in the conversation view: a header line (who, and how the answer ended)
over its body. While an answer streams it shows in a live view of lines (live_markdown.py)
that grows by appended deltas (answer_stream.py); then, as any answer does, as Markdown
whose code blocks copy on a click."""
from __future__ import annotations

from typing import Callable

from textual.containers import ScrollableContainer, Vertical
from textual.geometry import Size
from textual.widgets import Label, Markdown, Static
from textual.widgets.markdown import MarkdownFence

from .answer_stream import AnswerStream
from .conversation import ChatMessage
from .fold_above import AboveFolder
from .growing import BlankLines, LaidOutOnce
from .live_markdown import LiveMarkdown


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
    """Markdown whose code blocks copy on click, laid out independently of its column's height."""

    BLOCKS = {**Markdown.BLOCKS, "fence": CopyableFence, "code_block": CopyableFence}

    def get_content_height(self, container: Size, viewport: Size, width: int) -> int:
        """Textual arranges a column whose children are all of auto height within its
        container's height, so the cached arrangement of each answer in the conversation
        would be keyed on the conversation's height, which grows as an answer streams:
        every earlier answer and all its blocks would be laid out again on each frame.
        Markdown blocks are of auto height and do not depend on the container's height,
        so arranging within a height of 0 gives the same result under a key that only
        changes when the answer does."""
        return super().get_content_height(Size(container.width, 0), viewport, width)

    def code_blocks(self) -> list[str]:
        return [f.code for f in self.query(CopyableFence)]


class MessageView(BlankLines, LaidOutOnce, Vertical):
    """A user message, an answer, or a note from the app (errors, command replies)."""

    def __init__(self, message: ChatMessage | None, *, note: str | None = None, header: str = "",
                 on_rendered: Callable[[int, float], None] | None = None):
        role = "note" if message is None else message.role
        super().__init__(classes=f"message {role}")
        self.message = message
        self.note = note
        self.header = header
        self.on_rendered = on_rendered
        self._stream: AnswerStream | None = None

    def compose(self):
        if self.header:
            yield Label(self.header, classes="header", markup=False)
        if self.message is None:
            yield Static(self.note or "", classes="body", markup=False)
        elif self.message.role == "assistant":
            yield AnswerMarkdown(self.message.content, classes="body")
        else:
            yield Static(self.message.content, classes="body", markup=False)

    # ------------------------------------------------------------------ streaming
    @property
    def source(self) -> str:
        """An answer's Markdown as drawn so far."""
        if self._stream is not None:
            return self._stream.shown
        found = self.query(AnswerMarkdown)
        return found.first().source if found else ""

    def start_stream(self) -> AnswerStream:
        """Show the answer in a live view while it streams (until end_stream)."""
        live = LiveMarkdown(classes="body")
        with self.app.batch_update():
            self.query(AnswerMarkdown).remove()
            mounted = self.mount(live)
        view = next((a for a in self.ancestors if isinstance(a, ScrollableContainer)), None)
        folder = AboveFolder(view, self) if view is not None else None
        self._stream = AnswerStream(live, lambda text: AnswerMarkdown(text, classes="body"), self.on_rendered, mounted,
                                    folder)
        self._stream.start()
        return self._stream

    async def end_stream(self) -> None:
        if self._stream is not None:
            try:
                await self._stream.stop()
            finally:
                self._stream = None

    def set_header(self, text: str) -> None:
        self.header = text
        found = self.query(".header")
        if found:
            found.first(Label).update(text)

    def code_blocks(self) -> list[str]:
        if self._stream is not None:
            return self._stream.live.code_blocks()
        return [code for md in self.query(AnswerMarkdown) for code in md.code_blocks()]
