"""Streaming an answer into a column of Markdown widgets ("segments").

Deltas go to the last segment by Markdown.append, which re-parses only from its last
block; writes that arrive while one is drawn are joined into the next. When the last
segment holds a finished block (a new block has started after it), the new block moves
to a fresh segment and the finished ones stay where they are, never touched again. So a
token costs a re-parse of the block being written and a layout of one small widget: the
finished segments keep their cached layout however long the answer grows, and no block
is built twice except the one that moves, at each block boundary.

Margins between the blocks of one Markdown collapse (the gap is the larger of the two),
while margins in two segments would add up; so the last finished block keeps only the part
of its bottom margin that the next segment's first block does not already give. The answer
then looks the same, line for line, however the stream was chunked and wherever the
segments split: as one Markdown of the whole text would.

The segments' own ``source`` overlaps where a block moved on; ``shown`` is the answer's
text as drawn."""
from __future__ import annotations

import asyncio
import time
from typing import Callable

from textual.dom import NoScreen
from textual.widget import Widget
from textual.widgets import Markdown
from textual.widgets.markdown import MarkdownBlock

from .segment_fold import SegmentFolder

FRAME_SECONDS = 1 / 30
PAINT_WAIT_SECONDS = 0.25


class AnswerStream:
    def __init__(self, column: Widget, first: Markdown, new_segment: Callable[[], Markdown],
                 on_rendered: Callable[[int, float], None] | None = None, folder: SegmentFolder | None = None):
        self.column = column
        self.live = first
        self.segments = [first]
        self.folder = folder  # folds the finished segments far above the screen (segment_fold.py)
        self.new_segment = new_segment
        self.on_rendered = on_rendered  # (characters on screen, perf_counter time) after each drawn update
        self.shown = first.source
        self._above: MarkdownBlock | None = None  # the finished block just above the live segment
        self._above_margin = 0  # its own bottom margin, before the collapse
        self._pending: list[str] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def write(self, text: str) -> None:
        if text:
            self._pending.append(text)
            self._wake.set()
            await asyncio.sleep(0)

    async def stop(self) -> None:
        """Draw what is pending, then stop."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            task, self._task = self._task, None
            await asyncio.shield(task)
        self._report()
        if self.folder is not None:
            self.folder.unfold_all()

    async def _run(self) -> None:
        last = 0.0
        while True:
            await self._wake.wait()
            # at most one update per frame: a faster stream is joined into fewer, larger writes
            wait = last + FRAME_SECONDS - time.perf_counter()
            if wait > 0 and not self._closing:
                await asyncio.sleep(wait)
            last = time.perf_counter()
            self._wake.clear()
            chunk = "".join(self._pending)
            self._pending.clear()
            if chunk:
                await self.live.append(chunk)
                self.shown += chunk
                await self._start_segment_at_new_block()
                self._collapse_margin()
                if self.folder is not None:
                    self.folder.fold_far(self.segments[:-1])
                await self._painted()
                self._report()
            if self._closing and not self._pending:
                return

    async def _painted(self) -> None:
        """Wait until the screen has drawn the update. The screen repaints only when it
        falls idle outside a batch update, and appending holds batches while it mounts
        blocks: updates that follow each other without a pause can keep the screen from
        repainting until the answer ends. So the next update waits for this one's paint
        (or PAINT_WAIT_SECONDS, where the screen does not paint, e.g. under a dialog)."""
        painted = asyncio.get_running_loop().create_future()
        try:
            self.live.call_after_refresh(lambda: painted.done() or painted.set_result(None))
            self.column.screen.check_idle()  # the screen notices the update now, outside any batch
        except NoScreen:  # the answer's view is gone (the conversation was cleared)
            return
        try:
            await asyncio.wait_for(painted, PAINT_WAIT_SECONDS)
        except asyncio.TimeoutError:
            pass

    async def _start_segment_at_new_block(self) -> None:
        blocks = [c for c in self.live.children if isinstance(c, MarkdownBlock)]
        if len(blocks) < 2 or blocks[-1].source_range is None:
            return
        lines = self.live.source.splitlines(keepends=True)
        current = "".join(lines[blocks[-1].source_range[0]:])
        segment = self.new_segment()
        with self.column.app.batch_update():
            await blocks[-1].remove()
            await self.column.mount(segment)
            await segment.append(current)
        self.live = segment
        self.segments.append(segment)
        self._above = blocks[-2]
        self._above_margin = self._above.styles.margin.bottom

    def _collapse_margin(self) -> None:
        """Give the finished block above the live segment the bottom margin that makes the
        gap between them the larger of the two margins, as inside one Markdown. The live
        block's kind can still change (a paragraph becomes a table or a heading), so this
        runs after every update."""
        if self._above is None:
            return
        first = next((c for c in self.live.children if isinstance(c, MarkdownBlock)), None)
        top = first.styles.margin.top if first is not None else 0
        bottom = max(0, self._above_margin - top)
        margin = self._above.styles.margin
        if margin.bottom != bottom:
            self._above.styles.margin = (margin.top, margin.right, bottom, margin.left)

    def _report(self) -> None:
        if self.on_rendered is not None:
            self.on_rendered(len(self.shown), time.perf_counter())
