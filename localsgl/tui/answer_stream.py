"""Streaming an answer into its live view, then swapping in the final Markdown.

Writes are queued and drawn at most once a frame: a faster stream is joined into fewer,
larger appends to the live view (live_markdown.py), whose cost per update does not grow
with the answer. When the stream ends (or stops), the live view gives way to the final
Markdown widget, whose code blocks copy on click; the swap is one batch update, so the
screen never shows the answer half built.

While an answer streams, the objects that existed when it started are frozen out of the
garbage collector's reach (gc.freeze): a full collection walks every tracked object in
the process, which with an engine and a model loaded is tens of milliseconds, long
enough to stall the screen mid-answer. The stream's own garbage is still collected; the
frozen objects go back to the collector when the stream stops."""
from __future__ import annotations

import asyncio
import gc
import time
from typing import Callable

from textual.dom import NoScreen
from textual.widget import Widget
from textual.widgets import Markdown

from .fold_above import AboveFolder
from .live_markdown import LiveMarkdown

FRAME_SECONDS = 1 / 30
PAINT_WAIT_SECONDS = 0.25

_frozen_streams = 0  # streams in flight that keep the older objects frozen


def _freeze_old_objects() -> None:
    global _frozen_streams
    _frozen_streams += 1
    if _frozen_streams == 1:
        gc.freeze()


def _unfreeze_old_objects() -> None:
    global _frozen_streams
    _frozen_streams -= 1
    if _frozen_streams == 0:
        gc.unfreeze()


class AnswerStream:
    def __init__(self, live: LiveMarkdown, final_view: Callable[[str], Markdown],
                 on_rendered: Callable[[int, float], None] | None = None, mounted=None,
                 folder: AboveFolder | None = None):
        self.live = live
        self.folder = folder  # folds the conversation far above the screen while this streams
        self.final_view = final_view  # the Markdown widget that shows the whole answer
        self.on_rendered = on_rendered  # (characters on screen, perf_counter time) after each drawn update
        self.shown = ""
        self._mounted = mounted  # an awaitable: the live view is in the DOM
        self._pending: list[str] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        _freeze_old_objects()
        self._task = asyncio.create_task(self._run())

    async def write(self, text: str) -> None:
        if text:
            self._pending.append(text)
            self._wake.set()
            await asyncio.sleep(0)

    async def stop(self) -> None:
        """Draw what is pending, then show the whole answer in the final Markdown."""
        self._closing = True
        self._wake.set()
        if self._task is None:
            return
        task, self._task = self._task, None
        try:
            await asyncio.shield(task)
            await self._swap_to_final()
            self._report()
        finally:
            if self.folder is not None:
                self.folder.unfold_all()
            _unfreeze_old_objects()

    async def _run(self) -> None:
        if self._mounted is not None:
            await self._mounted
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
                self.live.append(chunk)
                self.shown += chunk
                if self.folder is not None:
                    self.folder.fold_far()
                await self._painted()
                self._report()
            if self._closing and not self._pending:
                return

    async def _painted(self) -> None:
        """Wait until the screen has drawn the update (or PAINT_WAIT_SECONDS, where the
        screen does not paint, e.g. under a dialog), so each report marks a drawn frame."""
        painted = asyncio.get_running_loop().create_future()
        try:
            self.live.call_after_refresh(lambda: painted.done() or painted.set_result(None))
            self.live.screen.check_idle()  # the screen notices the update now
        except NoScreen:  # the answer's view is gone (the conversation was cleared)
            return
        try:
            await asyncio.wait_for(painted, PAINT_WAIT_SECONDS)
        except asyncio.TimeoutError:
            pass

    async def _swap_to_final(self) -> None:
        live = self.live
        parent = live.parent
        if not live.is_attached or not isinstance(parent, Widget):
            return  # the answer's view is gone
        final = self.final_view(self.shown)
        with live.app.batch_update():
            await parent.mount(final, before=live)  # mounting builds the Markdown's blocks
            await live.remove()
            if self.folder is not None:
                self.folder.unfold_all()

    def _report(self) -> None:
        if self.on_rendered is not None:
            self.on_rendered(len(self.shown), time.perf_counter())
