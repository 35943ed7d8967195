"""Progress of a pull: rich bars on a terminal, plain lines otherwise, or a callback.

huggingface_hub reports a file's bytes through a tqdm-like class (``tqdm_class``): it
builds one per file (``total``, ``initial``, ``desc``) and calls ``update(n)`` as bytes
reach the disk (negative when a resumed download starts over). ``PullTracker.bar_class``
makes such a class that feeds one tracker, which sums the pull's bytes and tells a
display: ``RichDisplay`` (bytes, speed, ETA per file and in all), ``LineDisplay`` (a line
per file and every few seconds), or ``CallbackDisplay`` (a ``PullProgress`` for the
caller, e.g. the chat app's model screen, at most ten times a second).
"""
from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

from ..config import format_size


@dataclass(frozen=True)
class PullProgress:
    """Where a pull stands: bytes of the files it fetches that are on disk, of how many."""

    model: str
    file: str | None  # the file being fetched, None before the first and after the last
    done: int
    total: int | None
    files_done: int
    files_total: int
    finished: bool = False

    @property
    def fraction(self) -> float | None:
        return None if not self.total else min(1.0, self.done / self.total)


class Display:
    """What a tracker tells; the base shows nothing."""

    def started(self, p: PullProgress) -> None: ...
    def file_started(self, name: str, size: int | None, p: PullProgress) -> None: ...
    def advanced(self, name: str, file_done: int, p: PullProgress) -> None: ...
    def file_finished(self, name: str, size: int, seconds: float, p: PullProgress) -> None: ...
    def finished(self, p: PullProgress, seconds: float, ok: bool) -> None: ...


def _files(n: int) -> str:
    return f"{n} file" + ("" if n == 1 else "s")


def _rate(n: float, seconds: float) -> str:
    return f"{format_size(n / seconds)}/s" if seconds > 0 and n > 0 else "-"


class LineDisplay(Display):
    """Plain lines on stderr: a line per file, and one every ``every`` seconds during a file."""

    def __init__(self, stream=None, every: float = 10.0):
        self.stream = stream or sys.stderr
        self.every = every
        self._last = 0.0
        self._fetched = 0

    def _say(self, text: str) -> None:
        print(f"pull: {text}", file=self.stream, flush=True)

    def started(self, p):
        self._say(f"{p.model}: {_files(p.files_total)}, {format_size(p.total)}")

    def file_started(self, name, size, p):
        self._last = time.monotonic()
        self._fetched += 1
        self._say(f"{name} ({format_size(size)})")

    def advanced(self, name, file_done, p):
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            pct = f" {100 * p.fraction:.0f}%" if p.fraction is not None else ""
            self._say(f"{name}: {format_size(file_done)}{pct} of the pull")

    def file_finished(self, name, size, seconds, p):
        self._say(f"{name} done ({format_size(size)} in {seconds:.1f} s, {_rate(size, seconds)})")

    def finished(self, p, seconds, ok):
        if ok and not self._fetched:
            self._say(f"{p.model}: all {_files(p.files_done)} in the cache already")
        elif ok:
            self._say(f"{p.model}: {_files(p.files_done)}, {format_size(p.done)} in {seconds:.1f} s")


class RichDisplay(Display):
    """rich progress bars on stderr: the pull's total and the file being fetched."""

    def __init__(self, console=None):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.progress = Progress(
            TextColumn("{task.description}", justify="left"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console or Console(stderr=True),
            transient=False,
        )
        self._total = None
        self._files: dict[str, int] = {}

    def started(self, p):
        self.progress.start()
        self._total = self.progress.add_task(p.model, total=p.total, completed=p.done)

    def file_started(self, name, size, p):
        self._files[name] = self.progress.add_task(f"  {name}", total=size)

    def advanced(self, name, file_done, p):
        if name in self._files:
            self.progress.update(self._files[name], completed=file_done)
        self.progress.update(self._total, completed=p.done, total=p.total)

    def file_finished(self, name, size, seconds, p):
        task = self._files.pop(name, None)
        if task is not None:
            self.progress.remove_task(task)
        self.progress.update(self._total, completed=p.done, total=p.total)

    def finished(self, p, seconds, ok):
        for task in self._files.values():
            self.progress.remove_task(task)
        self.progress.stop()


class CallbackDisplay(Display):
    """Calls ``callback(PullProgress)``: on every file boundary, otherwise at most every
    ``interval`` seconds."""

    def __init__(self, callback: Callable[[PullProgress], None], interval: float = 0.1):
        self.callback = callback
        self.interval = interval
        self._last = 0.0

    def started(self, p):
        self.callback(p)

    def file_started(self, name, size, p):
        self.callback(p)

    def advanced(self, name, file_done, p):
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self.callback(p)

    def file_finished(self, name, size, seconds, p):
        self.callback(p)

    def finished(self, p, seconds, ok):
        self.callback(p)


def display_for(progress) -> Display:
    """The display for a pull's ``progress`` argument. None: rich bars when stderr is a
    terminal, plain lines otherwise; False: nothing; a callable: CallbackDisplay; a
    Display: itself."""
    if progress is False:
        return Display()
    if isinstance(progress, Display):
        return progress
    if callable(progress):
        return CallbackDisplay(progress)
    try:
        tty = sys.stderr.isatty()
    except (AttributeError, ValueError):
        tty = False
    return RichDisplay() if tty else LineDisplay()


class PullTracker:
    """Sums the bytes of one pull's files and tells a display (thread-safe)."""

    def __init__(self, model: str, files: dict[str, int | None], display: Display):
        self.model = model
        self.sizes = dict(files)
        self.display = display
        self._lock = threading.Lock()
        self._done_files: dict[str, int] = {}
        self._current: dict[str, int] = {}
        self._t0 = time.monotonic()
        self._file_t0: dict[str, float] = {}

    def snapshot(self, file: str | None = None, finished: bool = False) -> PullProgress:
        known = [s for s in self.sizes.values() if s is not None]
        total = sum(known) if len(known) == len(self.sizes) else None
        done = sum(self._done_files.values()) + sum(self._current.values())
        return PullProgress(self.model, file, done, total, len(self._done_files), len(self.sizes), finished)

    def set_files(self, files: dict[str, int | None]) -> None:
        """The pull's files once it knows them better (e.g. the shards an index names)."""
        with self._lock:
            self.sizes = dict(files)

    def start(self) -> None:
        with self._lock:
            self.display.started(self.snapshot())

    def already_there(self, name: str, size: int) -> None:
        """A file the cache holds already: counted as done, not shown as fetched."""
        with self._lock:
            self._done_files[name] = size

    def file_started(self, name: str, size: int | None, initial: int = 0) -> None:
        with self._lock:
            if name in self._current:
                return
            if size is not None:
                self.sizes[name] = size
            self._current[name] = initial
            self._file_t0[name] = time.monotonic()
            self.display.file_started(name, self.sizes.get(name), self.snapshot(name))

    def advance(self, name: str, n: int) -> None:
        with self._lock:
            self._current[name] = max(0, self._current.get(name, 0) + n)
            self.display.advanced(name, self._current[name], self.snapshot(name))

    def file_finished(self, name: str, size: int) -> None:
        with self._lock:
            self._current.pop(name, None)
            self._done_files[name] = size
            seconds = time.monotonic() - self._file_t0.pop(name, time.monotonic())
            self.display.file_finished(name, size, seconds, self.snapshot())

    def finish(self, ok: bool) -> None:
        with self._lock:
            self.display.finished(self.snapshot(finished=ok), time.monotonic() - self._t0, ok)

    def bar_class(self, name: str) -> type:
        """A tqdm-like class for huggingface_hub's ``tqdm_class`` that reports ``name``'s bytes."""
        tracker = self

        class _FileBar:
            def __init__(self, *args, total=None, initial=0, **kwargs):
                self.n = initial or 0
                self.total = total
                tracker.file_started(name, total, self.n)

            def update(self, n=1):
                if n:
                    self.n += n
                    tracker.advance(name, int(n))

            def update_transfer(self, n=1):  # network bytes (xet): progress counts bytes on disk
                pass

            def set_postfix_str(self, *args, **kwargs):
                pass

            set_transfer_postfix_str = set_postfix_str
            set_description = set_postfix_str
            set_description_str = set_postfix_str

            def refresh(self, *args, **kwargs):
                pass

            @property
            def format_dict(self):
                return {"n": self.n, "total": self.total, "rate": None}

            def close(self):
                pass

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

        return _FileBar
