"""Live `localsgl serve` processes on free loopback ports, shared per session.

``fake_server``: the server around tests/server/fake_engine.FakeEngine (fast, starts in
~1 s).  ``real_server``: the server around the real Engine on the tiny model
(smollm2-135m on CPU); skipped while the engine core has not landed.  Both run as
subprocesses through tests/server/_launch.py, bound to 127.0.0.1 with port 0; the port
is read from the startup line on stderr.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
API_KEY = "test-key-123"
FAKE_MODEL = "fake-echo"
REAL_MODEL = "smollm2-135m"
BODY_LIMIT = 1 << 20
REAL_ENGINE_KWARGS = {"model": REAL_MODEL, "device": "cpu", "max_model_len": 1024, "kv_memory": "1GiB"}


class LiveServer:
    def __init__(self, cfg: dict, env: dict | None = None, startup_timeout: float = 180.0):
        self.cfg = cfg
        e = dict(os.environ)
        e.pop("LOCALSGL_API_KEY", None)
        e.update(env or {})
        e["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "_launch.py"), json.dumps(cfg)],
            cwd=str(ROOT), env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.lines: list[str] = []
        self.banner: str | None = None
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + startup_timeout
        while not self._ready.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError("server did not start:\n" + "".join(self.lines[-40:]))
        # "localsgl serve: http://127.0.0.1:PORT/v1 model=..."
        url = self.banner.split()[2]
        self.base = url[: -len("/v1")]
        self.port = int(self.base.rsplit(":", 1)[1])
        sv = cfg.get("serve", {})
        self.api_key = sv.get("api_key") or (env or {}).get("LOCALSGL_API_KEY")
        self.model = FAKE_MODEL if cfg.get("fake") is not None else (sv.get("served_model_name") or REAL_MODEL)

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)
            if self.banner is None and line.startswith("localsgl serve: http://"):
                self.banner = line.strip()
                self._ready.set()

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, **kw) -> httpx.Client:
        kw.setdefault("timeout", 60.0)
        return httpx.Client(base_url=self.base, headers=self.headers, **kw)

    def openai(self, **kw):
        import openai

        kw.setdefault("timeout", 120.0)
        kw.setdefault("max_retries", 0)
        kw.setdefault("api_key", self.api_key or "none")
        return openai.OpenAI(base_url=self.base + "/v1", **kw)

    def async_openai(self, **kw):
        import openai

        kw.setdefault("timeout", 120.0)
        kw.setdefault("max_retries", 0)
        kw.setdefault("api_key", self.api_key or "none")
        return openai.AsyncOpenAI(base_url=self.base + "/v1", **kw)

    def metrics(self) -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families

        with self.client() as c:
            r = c.get("/metrics")
        r.raise_for_status()
        out: dict[str, float] = {}
        for fam in text_string_to_metric_families(r.text):
            for s in fam.samples:
                if s.name.endswith("_bucket"):
                    continue
                out[s.name] = out.get(s.name, 0.0) + s.value
        return out

    def wait_idle(self, timeout: float = 30.0) -> dict[str, float]:
        """Wait until the engine holds no request and no locked KV; return the metrics."""
        deadline = time.monotonic() + timeout
        m = {}
        while time.monotonic() < deadline:
            m = self.metrics()
            if (m.get("localsgl_num_requests_running") == 0 and m.get("localsgl_num_requests_waiting") == 0
                    and m.get("localsgl_kv_slots_locked") == 0 and m.get("localsgl_http_requests_inflight") == 0):
                return m
            time.sleep(0.05)
        raise AssertionError(f"server not idle after {timeout}s: " + json.dumps(
            {k: v for k, v in m.items() if "kv" in k or "requests" in k}, indent=1))

    def stop(self, sig=signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def assert_kv_pool_full(m: dict[str, float]) -> None:
    """No slot held by a request: every used slot belongs to the radix cache (evictable)."""
    assert m["localsgl_kv_slots_locked"] == 0, m
    if "localsgl_kv_slots_cached" in m:
        assert m["localsgl_kv_slots_used"] == m["localsgl_kv_slots_cached"], m
    assert m["localsgl_kv_slots_used"] <= m["localsgl_kv_slots_total"]


def real_engine_available() -> bool:
    if os.environ.get("LOCALSGL_TEST_SKIP_REAL"):
        return False
    try:
        from localsgl.engine import api
    except Exception:
        return False
    return "__init__" in api.Engine.__dict__


def fake_cfg(fake: dict | None = None, **serve) -> dict:
    s = {"host": "127.0.0.1", "port": 0, "api_key": API_KEY, "max_body_bytes": BODY_LIMIT}
    s.update(serve)
    return {"fake": fake or {}, "serve": s}


def real_cfg(engine_kwargs: dict | None = None, **serve) -> dict:
    s = {"host": "127.0.0.1", "port": 0, "api_key": API_KEY, "max_body_bytes": BODY_LIMIT}
    s.update(serve)
    return {"fake": None, "engine_kwargs": engine_kwargs or REAL_ENGINE_KWARGS, "serve": s}


@pytest.fixture(scope="session")
def fake_server():
    srv = LiveServer(fake_cfg())
    yield srv
    rc = srv.stop()
    assert rc == 0, "".join(srv.lines[-30:])


@pytest.fixture(scope="session")
def real_server():
    if not real_engine_available():
        pytest.skip("the real Engine has not landed yet (localsgl/engine/api.py is a skeleton)")
    srv = LiveServer(real_cfg(), startup_timeout=300.0)
    yield srv
    rc = srv.stop()
    assert rc == 0, "".join(srv.lines[-30:])


@pytest.fixture(scope="session", params=["fake", "real"])
def server(request):
    """Every server test that is about the HTTP contract runs against both engines."""
    return request.getfixturevalue(f"{request.param}_server")
