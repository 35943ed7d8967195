"""Security defaults: loopback bind, bearer key on every route but /health (flag or
LOCALSGL_API_KEY), CORS off unless origins are given; OpenAPI schema well formed."""
from __future__ import annotations

import inspect
from pathlib import Path

import httpx
from conftest import LiveServer
from fastapi.testclient import TestClient
from fake_engine import FakeEngine

from localsgl.server import app as server_app


def test_defaults_bind_loopback_and_env_api_key():
    sig = inspect.signature(server_app.serve)
    assert sig.parameters["host"].default == "127.0.0.1"
    srv = LiveServer({"fake": {}, "serve": {"port": 0}}, env={"LOCALSGL_API_KEY": "from-env"})
    try:
        assert srv.banner.startswith("localsgl serve: http://127.0.0.1:")
        assert "model=fake-echo" in srv.banner and "kv=" in srv.banner
        assert sum(line.startswith("localsgl serve:") for line in srv.lines) == 1
        with httpx.Client(base_url=srv.base) as c:
            assert c.get("/health").status_code == 200
            assert c.get("/v1/models").status_code == 401
            assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert c.get("/v1/models", headers={"Authorization": "Bearer from-env"}).status_code == 200
            assert c.get("/metrics", headers={"Authorization": "Bearer from-env"}).status_code == 200
            # CORS is off: no CORS headers, even for a preflight
            r = c.get("/health", headers={"Origin": "http://evil.example"})
            assert "access-control-allow-origin" not in r.headers
            r = c.options("/v1/models", headers={"Origin": "http://evil.example",
                                                 "Access-Control-Request-Method": "GET"})
            assert "access-control-allow-origin" not in r.headers
    finally:
        assert srv.stop() == 0


def test_no_key_means_open():
    eng = FakeEngine()
    try:
        with TestClient(server_app.create_app(eng)) as c:
            assert c.get("/v1/models").status_code == 200
    finally:
        eng.shutdown()


def test_cors_when_origin_given():
    eng = FakeEngine()
    try:
        app = server_app.create_app(eng, api_key="k", cors_origins=("http://localhost:3000",))
        with TestClient(app) as c:
            pre = c.options("/v1/chat/completions", headers={
                "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type"})
            assert pre.status_code == 200
            assert pre.headers["access-control-allow-origin"] == "http://localhost:3000"
            r = c.get("/v1/models", headers={"Origin": "http://localhost:3000", "Authorization": "Bearer k"})
            assert r.headers["access-control-allow-origin"] == "http://localhost:3000"
            r = c.get("/v1/models", headers={"Origin": "http://other.example", "Authorization": "Bearer k"})
            assert "access-control-allow-origin" not in r.headers
            assert c.get("/v1/models", headers={"Origin": "http://localhost:3000"}).status_code == 401
    finally:
        eng.shutdown()


def test_openapi_schema_documents_routes():
    eng = FakeEngine()
    try:
        with TestClient(server_app.create_app(eng, api_key="k")) as c:
            assert c.get("/openapi.json").status_code == 401
            spec = c.get("/openapi.json", headers={"Authorization": "Bearer k"}).json()
            for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics",
                         "/v1/tokenize", "/v1/detokenize"):
                assert path in spec["paths"], path
            body = spec["paths"]["/v1/chat/completions"]["post"]["requestBody"]
            assert body["content"]["application/json"]["schema"]["$ref"].endswith("/ChatCompletionRequest")
            req = spec["components"]["schemas"]["ChatCompletionRequest"]
            assert req["additionalProperties"] is False
            assert req["properties"]["model"]["enum"] == ["fake-echo"]
            assert spec["paths"]["/health"]["get"]["security"] == []
    finally:
        eng.shutdown()


def test_port_in_use_exits_1():
    import json
    import socket
    import subprocess
    import sys

    here = Path(__file__).resolve().parent

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        p = subprocess.run([sys.executable, str(here / "_launch.py"), json.dumps({"fake": {}, "serve": {"port": port}})],
                           capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stderr[-500:]
    assert "could not listen" in p.stderr
