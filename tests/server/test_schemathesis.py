"""Property-based fuzzing of every route from the app's own OpenAPI schema: no input may
produce a 5xx, and every answer must match the documented status codes, content types
and response schemas.  Valid (positive) and invalid (negative) inputs both.

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

@pytest.fixture(scope="module")
def fuzz_server():
    """A fake-engine server of its own: no step delay and a short context, so the many
    valid requests that ask for "as many tokens as fit" end quickly."""
    srv = LiveServer(fake_cfg({"step_delay": 0.0, "max_model_len": 128}))
    yield srv
    assert srv.stop() == 0


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES = {GenerationMode.POSITIVE: 50, GenerationMode.NEGATIVE: 40}


def _operations(srv):
    schema = schemathesis.openapi.from_url(srv.base + "/openapi.json", headers=srv.headers)
    return [r.ok() for r in schema.get_all_operations()]


@pytest.mark.parametrize("mode", list(EXAMPLES), ids=lambda m: m.value)
def test_api_never_5xx(fuzz_server, mode):
    ops = _operations(fuzz_server)
    labels = {op.label for op in ops}
    assert {"POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models", "POST /v1/tokenize",
            "POST /v1/detokenize", "GET /health", "GET /metrics"} <= labels, labels
    for op in ops:
        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES[mode], deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case):
            case.call_and_validate(base_url=fuzz_server.base, headers=fuzz_server.headers, checks=CHECKS, timeout=60)

        t0 = time.monotonic()
        try:
            run()
        except Unsatisfiable:
            if mode is GenerationMode.NEGATIVE and op.method.upper() == "GET":
                continue  # nothing to make invalid on a parameterless GET
            raise
        except Exception as e:
            raise AssertionError(f"{op.label} ({mode.value}): {e}") from e
        print(f"{op.label} {mode.value}: {time.monotonic() - t0:.1f}s")
    assert fuzz_server.proc.poll() is None
    fuzz_server.wait_idle()
