"""The live view of a streaming answer (live_markdown.py) and its swap for the final
Markdown (answer_stream.py): its lines are Rich's rendering of the text so far however
the stream was chunked, finished blocks are rendered once (again only when the width
changes), code is highlighted, and a stream that ends or stops leaves the final
Markdown holding the text, laid out as the same answer shown whole."""
from __future__ import annotations

import asyncio
import contextlib

import pytest
from chat_pilot import make_app, send_and_wait, wait_for
from scripted_engine import ScriptedEngine, tokens_of
from textual.app import App
from textual.widgets.markdown import MarkdownBlock

from localsgl.tui.conversation import ChatMessage
from localsgl.tui.live_markdown import LiveMarkdown, code_theme_for, markdown_parser, render_markdown, top_level_blocks
from localsgl.tui.message_view import AnswerMarkdown

# Blocks of every kind the live view splits at: headings, paragraphs, a fence, lists,
# a table, a rule (after which Rich puts no blank line) and a quote.
ANSWER = """Some text before a heading.

## A heading

A paragraph, then code:

```python
def greet(name):
    return f"hello {name}"
```

1. one
2. two

| a | b |
|---|---|
| 1 | 2 |

---
> a quote
> on two lines

- last
- items
"""


class LiveApp(App):
    CSS = "Screen { scrollbar-gutter: stable; }"  # the width stays as the answer outgrows the screen

    def compose(self):
        yield LiveMarkdown()


@contextlib.asynccontextmanager
async def mounted_live(height: int):
    """(app, pilot, the LiveMarkdown) of a LiveApp 70 columns wide, laid out."""
    app = LiveApp()
    async with app.run_test(size=(70, height)) as pilot:
        live = app.query_one(LiveMarkdown)
        await pilot.pause()
        yield app, pilot, live


def greet_line(live: LiveMarkdown):
    """The rendered line of ANSWER's code block that defines greet."""
    return next(s for s in live.lines(live.content_size.width) if "def greet" in s.text)


def rich_lines(live: LiveMarkdown, text: str, width: int) -> list[list]:
    """Rich's rendering of the whole ``text``, as segment lists."""
    console = live.app.console
    options = console.options.update(width=width, height=None, highlight=False)
    return [list(s) for s in render_markdown(text, console, options, code_theme_for(live.app))]


def live_lines(live: LiveMarkdown) -> list[list]:
    return [list(s) for s in live.lines(live.content_size.width)]


def chunks(text: str, size: int) -> list[str]:
    pieces = tokens_of(text)
    return ["".join(pieces[i:i + size]) for i in range(0, len(pieces), size)]


def test_blocks_split_where_rich_parses_them():
    starts = top_level_blocks(markdown_parser(), ANSWER)
    assert [kind for _, kind in starts] == ["paragraph_open", "heading_open", "paragraph_open", "fence",
                                            "ordered_list_open", "table_open", "hr", "blockquote_open",
                                            "bullet_list_open"]


@pytest.mark.parametrize("size", [1, 3, 1000])  # token by token, a few at a time, all at once
def test_live_lines_equal_richs_rendering_of_the_text_so_far(size):
    async def scenario():
        async with mounted_live(60) as (app, pilot, live):
            so_far = ""
            for i, piece in enumerate(chunks(ANSWER, size)):
                live.append(piece)
                so_far += piece
                if i % 7 == 0 or so_far == ANSWER:  # the middle of blocks as well as the end
                    width = live.content_size.width
                    assert live_lines(live) == rich_lines(live, so_far, width), f"after {so_far!r}"
            await pilot.pause()
            assert live.source == ANSWER
            assert live.size.height == len(rich_lines(live, ANSWER, live.content_size.width))

    asyncio.run(scenario())


def test_finished_blocks_render_once_and_again_only_when_the_width_changes():
    text = ANSWER * 3
    n_blocks = len(top_level_blocks(markdown_parser(), text))

    async def scenario():
        async with mounted_live(30) as (app, pilot, live):
            pieces = chunks(text, 2)
            for piece in pieces:
                live.append(piece)
            await pilot.pause()
            # every update renders the live block; each finished block renders once
            assert live.block_renders <= len(pieces) + n_blocks
            narrow_before = live.block_renders
            await pilot.resize_terminal(50, 30)
            await pilot.pause()
            width = live.content_size.width
            assert width < 50
            assert live_lines(live) == rich_lines(live, text, width)
            rerendered = live.block_renders - narrow_before
            assert n_blocks - 1 <= rerendered <= n_blocks + 2  # the finished blocks once more, and the live one
            for _ in range(5):  # repaints at the same width render nothing
                live.refresh()
                await pilot.pause()
            assert live.block_renders == narrow_before + rerendered

    asyncio.run(scenario())


def test_code_is_highlighted_and_copyable_while_it_streams():
    async def scenario():
        async with mounted_live(30) as (app, pilot, live):
            live.append(ANSWER)
            code = greet_line(live)
            colours = {seg.style.color for seg in code if seg.style and seg.style.color and seg.text.strip()}
            assert len(colours) >= 2  # keywords and names in different colours
            assert live.code_blocks() == ['def greet(name):\n    return f"hello {name}"']

    asyncio.run(scenario())


def test_a_theme_change_renders_the_lines_again_in_its_colours():
    async def scenario():
        async with mounted_live(40) as (app, pilot, live):
            live.append(ANSWER)
            await pilot.pause()

            def code_colours():
                return [seg.style.color for seg in greet_line(live) if seg.style and seg.text.strip()]

            before, renders = code_colours(), live.block_renders
            app.theme = "textual-light" if app.current_theme.dark else "textual-dark"
            await pilot.pause()
            assert live.block_renders > renders and code_colours() != before
            assert live_lines(live) == rich_lines(live, ANSWER, live.content_size.width)

    asyncio.run(scenario())


def test_a_streamed_answer_ends_as_final_markdown_laid_out_as_the_whole_answer(history):
    def block_layout(view) -> list[tuple[str, int, int]]:
        top = view.region.y
        return [(type(b).__name__, b.region.y - top, b.region.height)
                for b in view.query(MarkdownBlock) if isinstance(b.parent, AnswerMarkdown)]

    async def scenario():
        app = make_app(ScriptedEngine([ANSWER], tokens_per_second=200), history)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause()
            live_seen = []
            app.handle_input("show me blocks")
            assert app.answering
            while app.answering:  # plain sleeps: a pilot pause waits for a quiet app
                live_seen.append(len(app.query(LiveMarkdown)))
                await asyncio.sleep(0.02)
            await wait_for(pilot, lambda: not app.answering, 20, "the answer")
            await pilot.pause(0.1)
            streamed = app.chat.message_views()[-1]
            assert streamed.source == ANSWER
            assert not app.query(LiveMarkdown) and len(streamed.query(AnswerMarkdown)) == 1
            whole = app.chat.add_message(ChatMessage("assistant", ANSWER))
            await pilot.pause(0.1)
            assert streamed.code_blocks() == whole.code_blocks() == ['def greet(name):\n    return f"hello {name}"']
            return max(live_seen), block_layout(streamed), block_layout(whole)

    live_seen, streamed, whole = asyncio.run(scenario())
    assert live_seen == 1  # it did stream through the live view
    assert len(whole) == 9
    assert streamed == whole


def test_stopping_mid_stream_leaves_the_final_markdown_with_the_text_so_far(history):
    engine = ScriptedEngine([ANSWER * 10], tokens_per_second=100)

    async def scenario():
        app = make_app(engine, history)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause()
            app.handle_input("a long one")
            await wait_for(pilot, lambda: len(engine.emitted) > 40, 10, "some tokens")
            await pilot.press("escape")
            await wait_for(pilot, lambda: not app.answering, 10, "the stop")
            await pilot.pause(0.1)
            view = app.chat.message_views()[-1]
            reply = app.conversation.messages[-1]
            assert reply.finish_reason == "abort" and 0 < len(reply.content) < len(ANSWER * 10)
            assert not app.query(LiveMarkdown)
            finals = view.query(AnswerMarkdown)
            assert len(finals) == 1 and finals.first().source == reply.content == view.source

    asyncio.run(scenario())


def test_a_later_answer_repaints_and_stays_at_the_bottom_while_it_streams(history):
    text = ANSWER * 6

    async def scenario():
        app = make_app(ScriptedEngine([text], tokens_per_second=300), history)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause()
            await send_and_wait(pilot, "first", timeout=30)
            app.handle_input("second")
            assert app.answering
            heights, off_bottom = set(), 0
            conversation = app.chat.conversation_view
            while app.answering:  # plain sleeps: a pilot pause waits for a quiet app
                heights.add(app.chat.message_views()[-1].region.height)  # as last laid out on screen
                if conversation.max_scroll_y - conversation.scroll_y > 1:
                    off_bottom += 1
                await asyncio.sleep(0.03)
            return heights, off_bottom

    heights, off_bottom = asyncio.run(scenario())
    grown = [h for h in heights if h > 3]  # past the first lines: the end and at least one frame before it
    assert len(grown) >= 2, f"the answer was laid out at only {sorted(heights)} lines while it streamed"
    assert off_bottom == 0


def test_the_conversation_far_above_folds_while_an_answer_streams_and_unfolds_when_scrolled_to_or_done(history):
    text = ANSWER * 8
    folded_while_streaming: list[int] = []

    def layout(view) -> list[tuple[str, int, int]]:
        return [(type(b).__name__, b.region.y, b.region.height) for b in view.query(MarkdownBlock)
                if isinstance(b.parent, AnswerMarkdown)]

    async def scenario():
        app = make_app(ScriptedEngine([text], tokens_per_second=400), history,
                       on_rendered=lambda chars, t: folded_while_streaming.append(len(app.query(".-folded"))))
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause()
            await send_and_wait(pilot, "many blocks", timeout=30)
            first = app.chat.message_views()[-1]
            folded_while_streaming.clear()
            await send_and_wait(pilot, "again", timeout=30)
            await pilot.pause(0.1)
            folded_after = len(app.query(".-folded"))
            app.chat.conversation_view.scroll_to(y=0, animate=False)
            await pilot.pause(0.1)
            top = first.region.y
            first_after = [(k, y - top, h) for k, y, h in layout(first)]
            whole = app.chat.add_message(ChatMessage("assistant", text))
            await pilot.pause(0.1)
            app.chat.conversation_view.scroll_end(animate=False)
            await pilot.pause(0.1)
            top = whole.region.y
            whole_layout = [(k, y - top, h) for k, y, h in layout(whole)]

            # scrolling up while an answer streams unfolds what was folded, and nothing folds while away
            # (plain sleeps: a pilot pause or key press waits for a quiet app, i.e. the answer's end)
            app.link.engine.tokens_per_second = 150
            app.handle_input("once more")
            while app.answering and not app.query(".-folded"):
                await asyncio.sleep(0.02)
            folded_before_scrolling = len(app.query(".-folded"))
            app.chat.conversation_view.scroll_to(y=0, animate=False)
            await asyncio.sleep(0.05)
            assert app.answering  # still streaming: what follows is about a stream in flight
            folded_when_scrolled_up = len(app.query(".-folded"))
            await asyncio.sleep(0.3)
            folded_later = len(app.query(".-folded"))
            await wait_for(pilot, lambda: not app.answering, 30, "the third answer")
            return folded_after, (first_after, whole_layout), (folded_before_scrolling, folded_when_scrolled_up,
                                                                folded_later)

    folded_after, (first_after, whole), (before_scrolling, scrolled_up, later) = asyncio.run(scenario())
    assert max(folded_while_streaming) > 0
    assert folded_after == 0
    assert first_after == whole  # unfolded, the first answer lays out as before
    assert before_scrolling > 0 and scrolled_up == 0 and later == 0
