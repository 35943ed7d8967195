"""A streamed answer ends laid out line for line as the same answer shown whole (as a
reopened conversation shows it), however the stream was chunked: the answer streams into
several Markdown segments, and the gaps between them must come out as inside one."""
from __future__ import annotations

import asyncio

import pytest
from chat_pilot import make_app, send_and_wait
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
