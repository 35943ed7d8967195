"""The two engine modes: which tests run in both.

An engine's core runs on a thread of its front end (in-process) or in a child process.  An
engine a test builds without naming the mode -- ``Engine(...)``, the CLI (in this process or
as a subprocess), ``serve``, the chat TUI -- takes it from ``LOCALSGL_IN_PROCESS`` (1 or 0),
which subprocesses inherit.  scripts/test.sh runs the whole suite with LOCALSGL_IN_PROCESS=1,
then the tests of ENGINE_TEST_FILES (marked ``engine``) again with LOCALSGL_IN_PROCESS=0.
One variable rather than a parametrized fixture: it reaches engines built in subprocesses and
session-wide fixtures (a live server, a shared engine) without touching each builder.

The lists live in tests/engine_modes.py; tests/test_engine_modes.py fails when a test file
that looks like it builds an engine is in neither ENGINE_TEST_FILES nor NO_ENGINE_FILES.  A
test that only makes sense with the core in this process passes ``in_process=True`` and says
why; marked ``in_process_only``, the second pass skips it.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from engine_modes import ENGINE_TEST_FILES, TESTS


def pytest_configure(config):
    config.addinivalue_line("markers", "engine: builds an engine in the mode LOCALSGL_IN_PROCESS picks "
                                       "(scripts/test.sh runs it in both)")
    config.addinivalue_line("markers", "in_process_only: builds its engine in-process on purpose "
                                       "(the core-process pass skips it)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        try:
            rel = Path(str(item.fspath)).resolve().relative_to(TESTS).as_posix()
        except ValueError:
            continue
        if rel in ENGINE_TEST_FILES:
            item.add_marker(pytest.mark.engine)
