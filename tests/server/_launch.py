"""Subprocess entry point of the live-server tests: ``python _launch.py JSON``.

JSON: {"fake": {FakeEngine kwargs} | null, "engine_kwargs": {...} | null, "serve": {serve() kwargs}}.
With "fake" the server wraps tests/server/fake_engine.FakeEngine; otherwise serve() builds
the real localsgl.Engine from engine_kwargs, exactly as `localsgl serve` does.
"""
import json
import os
import sys

cfg = json.loads(sys.argv[1])
engine = None
if cfg.get("fake") is not None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from fake_engine import FakeEngine

    engine = FakeEngine(**cfg["fake"])

from localsgl.server.app import serve  # noqa: E402

sys.exit(serve(cfg.get("engine_kwargs"), engine=engine, **cfg.get("serve", {})))
