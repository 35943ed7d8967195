"""Graceful shutdown: SIGTERM/SIGINT stop accepting, let in-flight requests finish within
--shutdown-timeout, abort the rest, and exit 0."""
from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest
from conftest import LiveServer, fake_cfg


def _stream(srv, max_tokens: int, out: dict, started: threading.Event):
    lines = []
    try:
        with httpx.Client(base_url=srv.base, headers=srv.headers, timeout=60) as c:
            with c.stream("POST", "/v1/completions", json={"model": srv.model, "prompt": "x",
                                                           "max_tokens": max_tokens, "stream": True}) as r:
                out["status"] = r.status_code
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        lines.append(line[6:])
                        started.set()
    except httpx.HTTPError as e:
        out["exc"] = e
    finally:
        out["lines"] = lines
        started.set()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_inflight_request_finishes(sig):
    srv = LiveServer(fake_cfg({"step_delay": 0.01}, shutdown_timeout=20))
    out, started = {}, threading.Event()
    t = threading.Thread(target=_stream, args=(srv, 100, out, started))
    t.start()
    assert started.wait(30)
    t0 = time.monotonic()
    srv.proc.send_signal(sig)
    time.sleep(0.3)
    # the listening socket is closed: new connections are refused
    with pytest.raises(httpx.ConnectError):
        httpx.get(srv.base + "/health", timeout=5)
    rc = srv.proc.wait(30)
    t.join(30)
    assert rc == 0, "".join(srv.lines[-20:])
    assert out["status"] == 200 and "exc" not in out
    assert out["lines"][-1] == "[DONE]"
    finishes = [json.loads(x)["choices"][0]["finish_reason"] for x in out["lines"][:-1]]
    assert finishes[-1] == "length"
    assert time.monotonic() - t0 < 15


def test_deadline_aborts_inflight_requests():
    srv = LiveServer(fake_cfg({"step_delay": 0.02}, shutdown_timeout=1.0))
    results = [({}, threading.Event()) for _ in range(3)]
    threads = [threading.Thread(target=_stream, args=(srv, 100000 // 200, out, ev)) for out, ev in results]
    for t in threads:
        t.start()
    for _, ev in results:
        assert ev.wait(30)
    t0 = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    rc = srv.proc.wait(30)
    took = time.monotonic() - t0
    for t in threads:
        t.join(30)
    assert rc == 0, "".join(srv.lines[-20:])
    assert took < 8, took  # 1 s deadline + engine/uvicorn teardown, not the ~10 s the requests needed
    for out, _ in results:
        last = json.loads(out["lines"][-1])
        assert last["error"]["code"] == "aborted", out["lines"][-3:]
    assert any("aborted 3 request(s)" in line for line in srv.lines), srv.lines[-10:]

