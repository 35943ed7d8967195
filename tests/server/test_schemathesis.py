"""Property-based fuzzing of every route from the app's own OpenAPI schema: no input may
produce a 5xx, and every answer must match the documented status codes, content types
and response schemas.  Valid (positive) and invalid (negative) inputs both, against the
fake engine (many examples) and the real one (fewer, generation lengths capped so the
CPU model answers quickly; every other field stays fuzzed, so its tokenizer and chat
template see arbitrary text).  Headers that frame the HTTP message (Transfer-Encoding,
Content-Length, ...) stay the client library's: fuzzed, they make the request invalid HTTP,
which the HTTP server refuses itself (a plain-text 400) before any route sees it.

(schemathesis' pytest plugin does not work with this pytest, so the strategies are
driven with hypothesis directly.)"""
from __future__ import annotations

import time

import pytest
import schemathesis
from conftest import LiveServer, fake_cfg
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES = {
    "fake": {GenerationMode.POSITIVE: 50, GenerationMode.NEGATIVE: 40},
    "real": {GenerationMode.POSITIVE: 40, GenerationMode.NEGATIVE: 30},
}
GENERATION_OPS = {"POST /v1/chat/completions", "POST /v1/completions"}
# headers that frame the HTTP message itself, which the client library owns: a fuzzed value
# (``transfer-encoding: ;~``, ``content-length: x``) makes the request invalid HTTP, which the
# HTTP server refuses with its own plain-text 400 before the app sees it
FRAMING_HEADERS = {"transfer-encoding", "content-length", "host", "connection", "te", "trailer", "upgrade", "expect"}


@pytest.fixture(scope="module")
def fuzz_server():
    """A fake-engine server of its own: no step delay and a short context, so the many
    valid requests that ask for "as many tokens as fit" end quickly."""
    srv = LiveServer(fake_cfg({"step_delay": 0.0, "max_model_len": 128}))
    yield srv
    assert srv.stop() == 0


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _drop_framing_headers(case) -> None:
    for k in [k for k in (case.headers or {}) if k.lower() in FRAMING_HEADERS]:
        del case.headers[k]


def _cap(case) -> None:
    """Keep real-engine generations short: at most 4 tokens, 2 choices, 2 prompts."""
    b = case.body
    if not isinstance(b, dict):
        return
    for k in ("max_tokens", "max_completion_tokens"):
        if k in b and _is_int(b[k]) and b[k] > 4:
            b[k] = 4
    if "max_completion_tokens" not in b and ("max_tokens" not in b or b["max_tokens"] is None):
        b["max_tokens"] = 4
    if _is_int(b.get("n")) and b["n"] > 2:
        b["n"] = 2
    if _is_int(b.get("best_of")) and b["best_of"] > 2:
        b["best_of"] = 2
    p = b.get("prompt")
    if isinstance(p, list) and p and isinstance(p[0], (str, list)):
        b["prompt"] = p[:2]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
@pytest.mark.parametrize("kind", ["fake", "real"])
def test_api_never_5xx(request, kind, mode):
    srv = request.getfixturevalue("fuzz_server" if kind == "fake" else "real_server")
    schema = schemathesis.openapi.from_url(srv.base + "/openapi.json", headers=srv.headers)
    ops = [r.ok() for r in schema.get_all_operations()]
    labels = {op.label for op in ops}
    assert {"POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models", "POST /v1/tokenize",
            "POST /v1/detokenize", "GET /health", "GET /metrics"} <= labels, labels
    for op in ops:
        capped = kind == "real" and op.label in GENERATION_OPS

        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES[kind][mode], deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case):
            _drop_framing_headers(case)
            if capped:
                _cap(case)
            case.call_and_validate(base_url=srv.base, headers=srv.headers, checks=CHECKS, timeout=120)

        t0 = time.monotonic()
        try:
            run()
        except Unsatisfiable:
            if mode is GenerationMode.NEGATIVE and op.method.upper() == "GET":
                continue  # nothing to make invalid on a parameterless GET
            raise
        except Exception as e:
            raise AssertionError(f"{op.label} ({mode.value}, {kind} engine): {e}") from e
        print(f"{op.label} {mode.value} {kind}: {time.monotonic() - t0:.1f}s")
    assert srv.proc.poll() is None
    srv.wait_idle(timeout=60)
