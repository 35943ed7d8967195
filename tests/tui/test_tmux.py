"""The chat in a real terminal: tmux runs it, send-keys types, capture-pane reads the
screen. Skipped where tmux is not installed (CI machines start bare; on Debian/Ubuntu
`apt-get install tmux`). Each test runs its own tmux server on a private socket."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


class Tmux:
    def __init__(self, name: str):
        self.socket = f"localsgl-test-{os.getpid()}-{name}"

    def __call__(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], check=True, capture_output=True, text=True).stdout

    def start(self, command: str, env: dict[str, str]) -> None:
        exports = " ".join(f"{k}={v}" for k, v in env.items())
        self("new-session", "-d", "-x", "80", "-y", "24", f"cd {ROOT} && env {exports} {command}; echo EXIT=$?; sleep 30")

    def screen(self) -> str:
        return self("capture-pane", "-p")

    def wait_for(self, text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            shown = self.screen()
            if text in shown:
                return shown
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not on the screen after {timeout:.0f} s:\n{shown}")
            time.sleep(0.2)

    def keys(self, *keys: str) -> None:
        self("send-keys", *keys)

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)


@pytest.fixture
def tmux(request):
    t = Tmux(request.node.name[:40])
    yield t
    t.close()


def _env(tmp_path) -> dict[str, str]:
    return {"XDG_DATA_HOME": str(tmp_path / "data"), "XDG_CONFIG_HOME": str(tmp_path / "config"),
            "HF_HUB_OFFLINE": "1", "TERM": "xterm-256color"}


def test_typing_streaming_stopping_and_quitting_in_a_terminal(tmux, tmp_path):
    tmux.start(f"{sys.executable} {HERE / 'tmux_chat_app.py'} {tmp_path / 'chats.sqlite3'}", _env(tmp_path))
    tmux.wait_for("Message (Enter sends", 30)
    tmux.keys("hi there", "Enter")  # typed and sent in one burst
    shown = tmux.wait_for("Hello from tmux.", 15)  # Markdown: the asterisks are gone
    assert "you" in shown and "hi there" in shown
    assert "cache 0/" in tmux.wait_for("TTFT", 10).splitlines()[-2]  # the status line, above the keys
    tmux.keys("tell me more", "Enter")
    tmux.wait_for("word20", 15)
    tmux.keys("Escape")
    shown = tmux.wait_for("(stopped)", 10)
    assert "word1999" not in shown
    tmux.keys("C-q")
    tmux.wait_for("EXIT=0", 15)


def test_run_without_a_prompt_opens_the_chat_on_the_embedded_model(tmux, tmp_path):
    command = (f"{sys.executable} -m localsgl.cli run --device cpu --dtype float32 --kv-memory 32MiB "
               "--max-model-len 512 --max-tokens 4 --temperature 0")
    tmux.start(command, _env(tmp_path))
    tmux.wait_for("Message (Enter sends", 60)
    tmux.wait_for("KV 0/", 300)  # loaded: the status line has the KV pool
    tmux.keys("What is the capital of France?", "Enter")
    shown = tmux.wait_for("TTFT", 300)
    assert "smollm2-135m" in shown and "What is the capital of France?" in shown
    tmux.keys("C-q")
    tmux.wait_for("EXIT=0", 30)
