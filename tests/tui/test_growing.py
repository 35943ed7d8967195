"""The widgets that grow while an answer streams (growing.py): a streamed update costs one
layout of the screen, not two, and still reaches the screen with the view at the end; a
message's own background, rendered once and repeated, is what the widget would render line
by line, and a style whose lines differ (padding, border above or below) is rendered whole."""
from __future__ import annotations

import asyncio

import pytest
from chat_pilot import make_app, type_and_send, wait_for
from scripted_engine import ScriptedEngine
from textual._compositor import Compositor
from textual.app import App
from textual.containers import Vertical
from textual.geometry import Region
from textual.widgets import Label

from localsgl.tui.growing import BlankLines
from localsgl.tui.live_markdown import LiveMarkdown

ANSWER = "".join(f"Line {i} of a long answer that keeps the view scrolling.\n\n" for i in range(80))


def test_a_streamed_update_costs_one_layout(history, monkeypatch):
    layouts = []
    reflow = Compositor.reflow
    monkeypatch.setattr(Compositor, "reflow", lambda self, *a, **k: layouts.append(1) or reflow(self, *a, **k))
    appends = []  # per update: whether it added lines (a layout is then due)
    append = LiveMarkdown.append

    def counted_append(self, text):
        width = self.content_size.width
        before = len(self.lines(width)) if width > 0 else -1
        append(self, text)
        appends.append(width > 0 and len(self.lines(width)) != before)

    monkeypatch.setattr(LiveMarkdown, "append", counted_append)
    engine = ScriptedEngine([ANSWER], tokens_per_second=150)
    app = make_app(engine, history)
    counts = {}

    async def scenario():
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause()
            await type_and_send(pilot, "go")
            await wait_for(pilot, lambda: len(appends) >= 3, 30, "the first updates")
            first_layouts, first_appends = len(layouts), len(appends)
            await wait_for(pilot, lambda: not app.answering and app.conversation.messages[-1].role == "assistant",
                           60, "the whole answer")
            counts.update(updates=len(appends) - first_appends, growing=sum(appends[first_appends:]),
                          layouts=len(layouts) - first_layouts)
            view = app.chat.conversation_view
            assert view.scroll_y == view.max_scroll_y > 0  # the view followed the answer to its end
            assert app.conversation.messages[-1].content == ANSWER

    asyncio.run(scenario())
    assert counts["updates"] >= 20 and counts["growing"] >= 20, counts
    # a layout for each update that added lines, and a few for the status line and the swap to
    # the final Markdown; a second layout per update (what Textual asks for after a size
    # change) would double the count
    assert counts["layouts"] <= 1.15 * counts["growing"] + 8, counts


class Pair(App):
    CSS = """
    .box { height: 6; background: $panel; color: $text; }
    .padded { padding: 1 2; }
    .bordered { border: round $accent; }
    """

    def compose(self):
        for extra in ("", " padded", " bordered"):
            with BlankBox(classes="blank box" + extra):
                yield Label("hi")
            with Vertical(classes="plain box" + extra):
                yield Label("hi")


class BlankBox(BlankLines, Vertical):
    pass


@pytest.mark.parametrize("no_color", [False, True])
def test_blank_lines_equal_the_widgets_own_rendering(monkeypatch, no_color):
    if no_color:
        monkeypatch.setenv("NO_COLOR", "1")

    async def scenario():
        app = Pair()
        async with app.run_test(size=(30, 40)) as pilot:
            await pilot.pause()
            blanks, plains = list(app.query(".blank")), list(app.query(".plain"))
            assert len(blanks) == len(plains) == 3
            for blank, plain in zip(blanks, plains):
                for crop in (Region(0, 0, blank.size.width, blank.size.height),
                             Region(2, 1, blank.size.width - 4, 3)):  # all of it, and a crop inside
                    got = [list(s) for s in blank.render_lines(crop)]
                    assert got == [list(s) for s in plain.render_lines(crop)], (blank.classes, crop)

    asyncio.run(scenario())
