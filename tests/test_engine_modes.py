"""The suite's two engine modes (tests/conftest.py, tests/engine_modes.py): every test file that looks like it builds
an engine is listed as running in both modes or as building none of a mode to choose, and
LOCALSGL_IN_PROCESS picks the mode of every engine built without naming one."""
from __future__ import annotations

import re

import pytest

from engine_modes import ENGINE_TEST_FILES, NO_ENGINE_FILES, TESTS

# Engine(...) (not a fake's), the CLI (CliRunner or a subprocess), a live real server, an
# embedded `bench`, or a test taking a fixture that holds an engine or a server around one
BUILDS_ENGINE = re.compile(
    r"(?<![A-Za-z_])Engine\(|localsgl\.cli\b|from localsgl import [^\n]*\bcli\b|\breal_server\b|\breal_cfg\b"
    r"|_launch\.py|\bbench\.main\(|def test\w*\([^)]*\b(engine|backend|tokenizer|server)\b")


def test_every_engine_test_file_is_listed():
    flagged = {p.relative_to(TESTS).as_posix() for p in TESTS.rglob("test_*.py")
               if p.parent.name != "gpu" and not p.stem.endswith("_gpu")
               and BUILDS_ENGINE.search(p.read_text(encoding="utf-8"))}
    missing = sorted(flagged - ENGINE_TEST_FILES - set(NO_ENGINE_FILES))
    assert not missing, ("these test files look like they build an engine: add them to ENGINE_TEST_FILES "
                         f"(or NO_ENGINE_FILES, with why) in tests/engine_modes.py: {missing}")
    gone = sorted(f for f in ENGINE_TEST_FILES | set(NO_ENGINE_FILES) if not (TESTS / f).is_file())
    assert not gone, f"listed in tests/engine_modes.py but not there: {gone}"
    assert not ENGINE_TEST_FILES & set(NO_ENGINE_FILES)


@pytest.mark.parametrize("value", ["1", "0"])
def test_the_variable_overrides_the_commands_defaults_and_a_flag_overrides_it(monkeypatch, value):
    from localsgl import cli_common
    from localsgl.engine.api import default_in_process

    monkeypatch.setenv("LOCALSGL_IN_PROCESS", value)
    assert default_in_process() is (value == "1")
    for default in (None, False, True):  # run's and chat's None, serve's core process
        kwargs: dict = {}
        cli_common._engine_mode(kwargs, None, default)
        assert "in_process" not in kwargs  # the Engine reads the variable
    kwargs = {}
    cli_common._engine_mode(kwargs, value == "0")
    assert kwargs["in_process"] is (value == "0")
    monkeypatch.delenv("LOCALSGL_IN_PROCESS")
    assert default_in_process() is True
    kwargs = {}
    cli_common._engine_mode(kwargs, None, False)
    assert kwargs["in_process"] is False
