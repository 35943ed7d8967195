"""Snapshots of the chat's screens at 80x24 (pytest-textual-snapshot), over a scripted
engine with fixed timings so every figure is the same on every run. A layout change shows
up as a failed comparison; `pytest tests/tui/test_snapshots.py --snapshot-update` accepts
the new look after checking the report."""
from __future__ import annotations

import time

import pytest
from chat_pilot import make_app, wait_for
from scripted_engine import ScriptedEngine

from localsgl.tui import model_catalog
from localsgl.tui.conversation import Conversation

pytest.importorskip("pytest_textual_snapshot", reason="the snapshot plugin comes with the test extras")

ANSWER = """The capital of France is **Paris**. To check it in Python:

```python
capitals = {"France": "Paris", "Italy": "Rome"}
print(capitals["France"])
```

- population: about 2.1 million
- on the Seine
"""
FIXED_TIME = 1_780_000_000.0  # 2026-05-28 20:26:40 UTC


def scripted() -> ScriptedEngine:
    return ScriptedEngine([ANSWER, "Rome."], timing=(0.042, 0.5))


def steady(pilot) -> None:
    """No cursor blink: the message box looks the same whenever the snapshot is taken."""
    pilot.app.chat.prompt.cursor_blink = False


async def ask(pilot, text: str) -> None:
    app = pilot.app
    steady(pilot)
    n = len(app.conversation.messages)
    app.chat.prompt.load_text(text)
    await pilot.press("enter")
    await wait_for(pilot, lambda: not app.answering and len(app.conversation.messages) == n + 2, 10, "the answer")
    await pilot.pause(0.2)


@pytest.fixture
def fixed_clock(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    monkeypatch.setattr("localsgl.tui.history.time.time", lambda: FIXED_TIME)
    monkeypatch.setattr("localsgl.tui.conversation.time.time", lambda: FIXED_TIME)
    yield
    monkeypatch.undo()
    time.tzset()


def test_chat_after_two_turns(snap_compare, history, fixed_clock):
    async def before(pilot):
        await ask(pilot, "What is the capital of France?")
        await ask(pilot, "And of Italy?")

    assert snap_compare(make_app(scripted(), history), run_before=before, terminal_size=(80, 24))


def test_chat_without_colour(snap_compare, history, fixed_clock, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")

    async def before(pilot):
        assert pilot.app.no_color
        await ask(pilot, "What is the capital of France?")

    assert snap_compare(make_app(scripted(), history), run_before=before, terminal_size=(80, 24))


def test_help_screen(snap_compare, history, fixed_clock):
    async def before(pilot):
        steady(pilot)
        await pilot.press("f1")
        await pilot.pause(0.2)

    assert snap_compare(make_app(scripted(), history), run_before=before, terminal_size=(80, 24))


def test_model_screen(snap_compare, history, fixed_clock, monkeypatch):
    rows = [
        model_catalog.ModelRow("scripted-model", "GGUF Q4_1", 98_362_432, 134_515_008, "embedded", None),
        model_catalog.ModelRow("Qwen/Qwen3-8B", "safetensors BF16", 16_381_000_000, 8_190_735_360, "hub", None),
    ]
    monkeypatch.setattr(model_catalog, "local_models", lambda: rows)

    async def before(pilot):
        steady(pilot)
        await pilot.press("f2")
        await wait_for(pilot, lambda: getattr(pilot.app.screen, "rows", None), 10, "the model list")

    assert snap_compare(make_app(scripted(), history), run_before=before, terminal_size=(80, 24))


def test_sessions_screen(snap_compare, history, fixed_clock):
    for title in ["How does the radix cache work?", "Write a haiku about GPUs"]:
        conv = Conversation(model="scripted-model")
        conv.add("user", title)
        conv.add("assistant", "…")
        history.save(conv)

    async def before(pilot):
        steady(pilot)
        await pilot.press("f3")
        await pilot.pause(0.2)

    assert snap_compare(make_app(scripted(), history), run_before=before, terminal_size=(80, 24))
