"""A streamed answer ends laid out line for line as the same answer shown whole (as a
reopened conversation shows it), however the stream was chunked: the answer streams into
several Markdown segments, and the gaps between them must come out as inside one. While
it streams, the screen repaints it, and segments far above the screen fold."""
from __future__ import annotations

import asyncio

import pytest
from chat_pilot import make_app, send_and_wait, wait_for
from scripted_engine import ScriptedEngine
from textual.widgets.markdown import MarkdownBlock

from localsgl.tui.conversation import ChatMessage
from localsgl.tui.message_view import AnswerMarkdown

# Blocks whose margins differ: a heading's top margin is larger than a paragraph's bottom
# one, a fence has both, lists and tables only a bottom one.
ANSWER = """Some text before a heading.

## A heading

A paragraph, then code:

```python
print("hi")
```

1. one
2. two

| a | b |
|---|---|
| 1 | 2 |

- last
"""


def block_layout(view) -> list[tuple[str, int, int]]:
    """(kind, line offset in the view, height) of each of the answer's top-level blocks."""
    top = view.region.y
    return [(type(b).__name__, b.region.y - top, b.region.height)
            for b in view.query(MarkdownBlock) if isinstance(b.parent, AnswerMarkdown)]


@pytest.mark.parametrize("rate", [120.0, 0.0])  # a block or so per frame; all at once
def test_a_streamed_answer_lays_out_as_the_whole_answer(history, rate):
    async def scenario():
        app = make_app(ScriptedEngine([ANSWER], tokens_per_second=rate), history)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause()
            await send_and_wait(pilot, "show me blocks", timeout=20)
            await pilot.pause(0.1)
            streamed = app.chat.message_views()[-1]
            assert streamed.source == ANSWER
            segments = len(streamed.query(AnswerMarkdown))
            whole = app.chat.add_message(ChatMessage("assistant", ANSWER))
            await pilot.pause(0.1)
            return block_layout(streamed), block_layout(whole), segments

    streamed, whole, segments = asyncio.run(scenario())
    if rate:
        assert segments > 2  # the answer did stream into segments: the check below means something
    assert len(whole) == 7
    assert streamed == whole


def test_segments_far_above_the_screen_fold_while_streaming_and_unfold_when_scrolled_to_or_done(history):
    text = ANSWER * 8
    folded_while_streaming: list[int] = []

    async def scenario():
        app = make_app(ScriptedEngine([text], tokens_per_second=400), history,
                       on_rendered=lambda chars, t: folded_while_streaming.append(len(app.query(".-folded"))))
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause()
            await send_and_wait(pilot, "many blocks", timeout=30)
            await pilot.pause(0.1)
            streamed = app.chat.message_views()[-1]
            assert streamed.source == text
            folded_after = len(app.query(".-folded"))
            whole = app.chat.add_message(ChatMessage("assistant", text))
            await pilot.pause(0.1)
            layouts = block_layout(streamed), block_layout(whole)

            # scrolling up while an answer streams unfolds what was folded, and nothing folds while away
            # (plain sleeps: a pilot pause or key press waits for a quiet app, i.e. the answer's end)
            app.link.engine.tokens_per_second = 150
            app.handle_input("again")
            while app.answering and not app.query(".-folded"):
                await asyncio.sleep(0.02)
            folded_before_scrolling = len(app.query(".-folded"))
            app.chat.conversation_view.scroll_to(y=0, animate=False)
            await asyncio.sleep(0.05)
            assert app.answering  # still streaming: what follows is about a stream in flight
            folded_when_scrolled_up = len(app.query(".-folded"))
            await asyncio.sleep(0.3)
            folded_later = len(app.query(".-folded"))
            await wait_for(pilot, lambda: not app.answering, 30, "the second answer")
            return folded_after, layouts, (folded_before_scrolling, folded_when_scrolled_up, folded_later)

    folded_after, (streamed, whole), (before_scrolling, scrolled_up, later) = asyncio.run(scenario())
    assert max(folded_while_streaming) > 0
    assert folded_after == 0
    assert streamed == whole
    assert before_scrolling > 0 and scrolled_up == 0 and later == 0


def test_a_later_answer_repaints_while_it_streams(history):
    """Appending holds batch updates while blocks mount; the screen must still repaint
    between updates, in a conversation's second answer as in its first."""
    text = ANSWER * 6

    async def scenario():
        app = make_app(ScriptedEngine([text], tokens_per_second=300), history)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause()
            await send_and_wait(pilot, "first", timeout=30)
            app.handle_input("second")
            assert app.answering
            heights = set()  # sampled with plain sleeps: a pilot pause waits for a quiet app
            while app.answering:
                heights.add(app.chat.message_views()[-1].region.height)  # as last laid out on screen
                await asyncio.sleep(0.03)
            return heights

    heights = asyncio.run(scenario())
    grown = [h for h in heights if h > 3]  # past the first lines: the end and at least one frame before it
    assert len(grown) >= 2, f"the answer was laid out at only {sorted(heights)} lines while it streamed"
