"""Fixtures of the chat app's tests: a private XDG home per test and a history store
(the helpers that drive the app are in chat_pilot.py)."""
from __future__ import annotations

import pytest

from localsgl.tui.history import ChatHistory


@pytest.fixture(autouse=True)
def private_home(tmp_path, monkeypatch):
    """Conversations and config go under tmp_path, never the user's own dirs."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("LOCALSGL_CONFIG", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


@pytest.fixture
def history(tmp_path) -> ChatHistory:
    return ChatHistory(tmp_path / "chats.sqlite3")
