"""engine/host_malloc.py: glibc takes the thresholds (it refuses values past its limits,
e.g. an mmap threshold over 32 MiB), once per process; elsewhere nothing is changed."""
from __future__ import annotations

import platform

import pytest

from localsgl.engine import host_malloc


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the thresholds are glibc's")
def test_glibc_takes_the_thresholds_once(monkeypatch):
    monkeypatch.setattr(host_malloc, "_done", False)
    assert host_malloc.keep_freed_memory()
    monkeypatch.setattr(host_malloc.ctypes, "CDLL", lambda *a: pytest.fail("set twice"))
    assert host_malloc.keep_freed_memory()


def test_other_systems_are_left_alone(monkeypatch):
    monkeypatch.setattr(host_malloc, "_done", False)
    monkeypatch.setattr(host_malloc.sys, "platform", "darwin")
    assert not host_malloc.keep_freed_memory()
