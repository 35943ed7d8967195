"""`localsgl bench serving` on the CPU: a tiny rate sweep against the embedded server.

One run (through localsgl.bench.main's dispatch) prints the table to stdout and writes
the per-request records with --output-json; both are checked.
"""
from __future__ import annotations

import json
import math

import pytest

from localsgl import bench, bench_serving, bench_serving_client

ENGINE = {"model": "smollm2-135m", "device": "cpu", "kv_memory": "256MiB", "max_model_len": 1024}


def test_percentile():
    assert bench_serving.percentile([], 50) is None
    assert bench_serving.percentile([3.0], 99) == 3.0
    assert bench_serving.percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert bench_serving.percentile(list(map(float, range(101))), 99) == pytest.approx(99.0)


def test_rejects_non_loopback_url(capsys):
    assert bench_serving.main({}, ["--url", "http://example.com:8000"], False) == 2
    assert "loopback" in capsys.readouterr().err


def test_serving_sweep_cpu(tmp_path, capsys):
    out = tmp_path / "serving.json"
    rc = bench.main("serving", dict(ENGINE), [
        "--num-prompts", "8", "--input-len", "32", "--output-len", "8", "--request-rate", "inf", "4",
        "--max-seconds", "60", "--output-json", str(out)], json_output=False)
    text = capsys.readouterr().out
    assert rc == 0, text

    lines = text.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.split()[:1] == ["rate"])
    for col in bench_serving.COLUMNS:
        assert col in lines[header]
    table = [ln.split() for ln in lines[header + 1: header + 3]]
    assert [r[0] for r in table] == ["inf", "4"]
    for r in table:
        assert r[1] == "-" and r[2] == "8" and r[3] == "0"  # conc, done, fail
        # TTFT p50 <= e2e p50, TTFT p99 <= e2e of the slowest request (checked per request below)
        assert float(r[6]) <= float(r[10])
    assert "x offline" in text and "offline engine.generate" in text

    info = json.loads(out.read_text())
    assert info["in_process"] and info["offline"]["output_tokens"] == 8 * 8
    assert [r["request_rate"] for r in info["rows"]] == ["inf", 4.0]
    for row in info["rows"]:
        assert row["completed"] == 8 and row["failed"] == 0 and row["short_outputs"] == 0
        assert row["output_tokens"] == 8 * 8 and row["ttft_le_e2e"]
        assert row["itl_ms_p50"] is not None and row["itl_ms_p50"] <= row["itl_ms_p99"]
        assert math.isfinite(row["vs_offline"]) and row["vs_offline"] > 0
        assert len(row["requests"]) == 8
        for q in row["requests"]:
            assert q["ok"] and q["out_tokens"] == q["want_tokens"] == 8 and q["in_tokens"] == 32
            assert 0 < q["ttft"] <= q["e2e"]
    assert info["saturation"]["request_rate"] == "inf"


def test_raw_and_httpx_clients_agree():
    """The bare asyncio client (the default) and httpx read the same streams the same way, and
    both report a refused request as its HTTP status and error body."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "server"))
    from fake_engine import FakeEngine

    engine = FakeEngine(step_delay=0.001)
    server = bench_serving.EmbeddedServer(engine, api_key=None, max_queue=64)
    server.start()
    try:
        base = {"url": server.url, "api_key": None, "model": engine.model_name, "max_seconds": 60,
                "request_timeout": 30, "rate": math.inf, "concurrency": None, "seed": 0}
        prompts, outs = [[65 + i] * (3 + i) for i in range(6)], [1, 2, 5, 9, 17, 33]
        for client in ("raw", "httpx"):
            res = bench_serving_client.client_run({**base, "prompts": prompts, "outs": outs, "http_client": client})
            for q, want in zip(res["requests"], outs):
                assert q["ok"] and q["error"] is None, (client, q)
                assert q["out_tokens"] == want and 0 < q["ttft"] <= q["e2e"], (client, q)
                assert len(q["itl"]) <= want - 1
            bad = bench_serving_client.client_run({**base, "prompts": [[100000]], "outs": [4], "http_client": client})
            q = bad["requests"][0]
            assert not q["ok"] and q["error"].startswith("HTTP 400") and "out of range" in q["error"], (client, q)
    finally:
        server.stop()
        engine.shutdown()
