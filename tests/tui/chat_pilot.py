"""Helpers that drive the chat app in tests: an app over any engine, a wait that pumps
the app until a condition holds, and sending a message."""
from __future__ import annotations

import asyncio
import time

from localsgl.tui.app import ChatApp
from localsgl.tui.engine_link import EngineLink
from localsgl.tui.history import ChatHistory


def make_app(engine, history: ChatHistory, *, sampling=None, own=False, **kw) -> ChatApp:
    link = EngineLink({"model": getattr(engine, "model_name", "m")}, engine=engine, own=own, sampling=sampling)
    return ChatApp(link, history=history, **kw)


async def wait_for(pilot, condition, timeout: float = 30.0, what: str = "condition") -> None:
    """Let the app run until ``condition()`` is true, then until it has handled what is
    pending; fail after ``timeout`` seconds. The polling itself is a plain sleep: a pilot
    pause posts a message to every widget and forces a layout and a repaint, which, many
    times a second on the app's own thread, costs more than a streaming answer's updates."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.02)
    await pilot.pause()


async def type_and_send(pilot, text: str) -> None:
    app = pilot.app
    app.chat.prompt.load_text(text)
    await pilot.press("enter")
    await pilot.pause()


async def send_and_wait(pilot, text: str, timeout: float = 30.0) -> None:
    app = pilot.app
    before = len([m for m in app.conversation.messages if m.role == "assistant"])
    await type_and_send(pilot, text)
    await wait_for(pilot, lambda: not app.answering and
                   len([m for m in app.conversation.messages if m.role == "assistant"]) > before,
                   timeout, f"the answer to {text!r}")
