"""Shared fixtures: one CPU engine on the embedded model (SmolLM2-135M) for the whole
directory, and its grammar backend (the llguidance tokenizer is built once)."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ENGINE_KWARGS = {"model": "smollm2-135m", "device": "cpu", "max_model_len": 1024, "kv_memory": "96MiB"}


@pytest.fixture(scope="session")
def engine():
    from localsgl import Engine

    eng = Engine(**ENGINE_KWARGS)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="session")
def backend(engine):
    return engine.grammar_backend


@pytest.fixture(scope="session")
def tokenizer(engine):
    return engine.tokenizer
