"""The chat app over a scripted engine, run as a program: what the tmux test drives.

usage: python tmux_chat_app.py HISTORY.sqlite3"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from chat_pilot import make_app  # noqa: E402
from scripted_engine import ScriptedEngine  # noqa: E402

from localsgl.tui.history import ChatHistory  # noqa: E402

LONG = " ".join(f"word{i}" for i in range(2000))

if __name__ == "__main__":
    engine = ScriptedEngine(["Hello from **tmux**.", LONG], tokens_per_second=40)
    app = make_app(engine, ChatHistory(sys.argv[1]))
    app.run()
    sys.exit(app.return_code or 0)
