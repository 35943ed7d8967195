"""The chat's entry points: `localsgl chat` and `localsgl run` with no prompt on a
terminal reach run_chat with the resolved engine flags; without a terminal they do not."""
from __future__ import annotations

import sys

import pytest
from typer.testing import CliRunner

from localsgl import cli, cli_run

runner = CliRunner()


class _Terminal:
    """Stands in for sys.stdout on a terminal."""

    def __init__(self, real):
        self.real = real

    def isatty(self):
        return True

    def __getattr__(self, name):
        return getattr(self.real, name)


@pytest.fixture
def opened(monkeypatch):
    """Pretend stdin and stdout are terminals and record what run_chat is given."""
    calls = []

    def fake_run_chat(engine_kwargs, **kw):
        calls.append({"engine_kwargs": engine_kwargs, **kw})
        return 0

    import localsgl.tui

    monkeypatch.setattr(localsgl.tui, "run_chat", fake_run_chat)
    monkeypatch.setattr(cli_run, "_stdin_is_terminal", lambda: True)
    real_open = cli_run._open_chat

    def open_with_terminal(*a, **kw):
        monkeypatch.setattr(sys, "stdout", _Terminal(sys.stdout))
        return real_open(*a, **kw)

    monkeypatch.setattr(cli_run, "_open_chat", open_with_terminal)
    monkeypatch.delenv("LOCALSGL_MODEL", raising=False)
    return calls


def test_chat_passes_engine_flags_sampling_and_its_own_options(opened):
    r = runner.invoke(cli.app, ["chat", "-m", "smollm2-135m", "--device", "cpu", "--kv-memory", "64MiB",
                                "--temperature", "0.1", "--system", "Be brief.", "--resume", "--inline"])
    assert r.exit_code == 0, r.output
    (call,) = opened
    assert call["engine_kwargs"]["model"] == "smollm2-135m" and call["engine_kwargs"]["device"] == "cpu"
    assert call["engine_kwargs"]["kv_memory"] == 64 << 20
    assert call["sampling"] == {"temperature": 0.1}
    assert call["system"] == "Be brief." and call["resume"] and call["inline"] and call["model_given"]


def test_chat_without_a_model_flag_lets_resume_pick_the_saved_model(opened):
    r = runner.invoke(cli.app, ["chat", "--resume"])
    assert r.exit_code == 0, r.output
    assert opened[0]["model_given"] is False and opened[0]["engine_kwargs"]["model"] == "smollm2-135m"


def test_run_with_no_prompt_on_a_terminal_opens_the_chat(opened):
    r = runner.invoke(cli.app, ["run", "--max-tokens", "7", "--device", "cpu", "--system", "Hi."])
    assert r.exit_code == 0, r.output
    (call,) = opened
    assert call["sampling"] == {"max_tokens": 7} and call["system"] == "Hi." and not call["resume"]
    assert call["engine_kwargs"]["device"] == "cpu"


def test_chat_refuses_without_a_terminal():
    r = runner.invoke(cli.app, ["chat"], input="")
    assert r.exit_code == 2
    assert "needs a terminal" in r.stderr


def test_bad_sampling_flag_is_a_usage_error_before_the_app_starts(opened):
    r = runner.invoke(cli.app, ["chat", "--temperature", "-1"])
    assert r.exit_code == 2 and not opened


def test_run_chat_reads_the_tui_table_and_runs_inline(monkeypatch, tmp_path):
    from localsgl.tui import app as app_module
    from localsgl.tui import run_chat

    config = tmp_path / "config.toml"
    config.write_text('model = "smollm2-135m"\n[tui]\ntheme = "nord"\n[tui.keys]\nsend = "ctrl+s"\nmodels = ["f6", "ctrl+o"]\n')
    monkeypatch.setenv("LOCALSGL_CONFIG", str(config))
    seen = {}

    def fake_run(self, **kw):
        seen.update(kw, keymap=self.keymap, theme=self._theme_name, model=self.link.model_spec)

    monkeypatch.setattr(app_module.ChatApp, "run", fake_run)
    assert run_chat({"model": "smollm2-135m"}, inline=True) == 0
    assert seen["inline"] and seen["inline_no_clear"]
    assert seen["keymap"] == {"send": "ctrl+s", "models": "f6,ctrl+o"} and seen["theme"] == "nord"
    # the [tui] table is the chat's: the engine settings reader does not warn about it
    from localsgl.config import load_config_file

    assert "tui" not in load_config_file(config)
