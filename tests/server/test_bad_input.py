"""Bad input: every case is a 4xx with an OpenAI error body, and the server keeps serving."""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from conftest import BODY_LIMIT, LiveServer, fake_cfg

CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
MSG = [{"role": "user", "content": "hi"}]


def chat(**kw):
    body = {"model": "MODEL", "messages": MSG, "max_tokens": 2}
    body.update(kw)
    return body


def comp(**kw):
    body = {"model": "MODEL", "prompt": "hi", "max_tokens": 2}
    body.update(kw)
    return body


# (id, path, body: dict | bytes | callable(server) -> dict|bytes, status, param or None, code or None)
CASES = [
    ("malformed_json", CHAT, b'{"model": "x", "messages": [', 400, None, "invalid_json"),
    ("not_an_object", CHAT, b"[1, 2, 3]", 400, None, "invalid_json"),
    ("empty_body", CHAT, b"", 400, None, "invalid_json"),
    ("nan_literal", CHAT, b'{"model": "MODEL", "messages": [{"role":"user","content":"hi"}], "temperature": NaN}',
     400, None, "invalid_json"),
    ("deep_nesting", CHAT, b"[" * 100000 + b"]" * 100000, 400, None, "invalid_json"),
    ("invalid_utf8", CHAT, b'{"model": "MODEL", "messages": [{"role": "user", "content": "\xff\xfe bad"}]}',
     400, None, "invalid_encoding"),
    ("lone_surrogate", CHAT, b'{"model": "MODEL", "messages": [{"role": "user", "content": "\\ud800 x"}]}',
     400, None, "invalid_encoding"),
    ("oversized_body", CHAT, lambda s: json.dumps(chat(messages=[{"role": "user", "content": "a" * (BODY_LIMIT + 10)}])
                                                  ).encode(), 413, None, "request_too_large"),
    ("missing_model", CHAT, {"messages": MSG}, 400, "model", "missing_required_parameter"),
    ("missing_messages", CHAT, {"model": "MODEL"}, 400, "messages", "missing_required_parameter"),
    ("unknown_model", CHAT, chat(model="gpt-17-ultra"), 404, "model", "model_not_found"),
    ("unknown_model_completions", COMP, comp(model="nope"), 404, "model", "model_not_found"),
    ("empty_messages", CHAT, chat(messages=[]), 400, "messages", None),
    ("messages_wrong_type", CHAT, chat(messages="hi"), 400, "messages", None),
    ("message_bad_role", CHAT, chat(messages=[{"role": "wizard", "content": "x"}]), 400, "messages[0].role", None),
    ("content_wrong_type", CHAT, chat(messages=[{"role": "user", "content": 5}]), 400, "messages[0].content", None),
    ("image_content", CHAT, chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://127.0.0.1/x.png"}}]}]), 400, "messages[0].content[0]",
     "unsupported_parameter"),
    ("max_tokens_string", CHAT, chat(max_tokens="5"), 400, "max_tokens", "invalid_type"),
    ("max_tokens_negative", CHAT, chat(max_tokens=-1), 400, "max_tokens", None),
    ("max_tokens_zero", COMP, comp(max_tokens=0), 400, "max_tokens", None),
    ("max_tokens_beyond_context", CHAT, lambda s: chat(max_tokens=s.max_model_len + 1), 400, "max_tokens",
     "context_length_exceeded"),
    ("max_tokens_plus_prompt_beyond_context", COMP, lambda s: comp(prompt="hello hello hello", max_tokens=s.max_model_len - 1), 400,
     "max_tokens", "context_length_exceeded"),
    ("max_completion_tokens_negative", CHAT, chat(max_completion_tokens=-5), 400, "max_completion_tokens", None),
    ("prompt_too_long", COMP, lambda s: comp(prompt="hello " * (s.max_model_len * 2)), 400, "prompt",
     "context_length_exceeded"),
    ("messages_too_long", CHAT, lambda s: chat(messages=[{"role": "user", "content": "hello " * (2 * s.max_model_len)}]),
     400, "messages", "context_length_exceeded"),
    ("temperature_negative", CHAT, chat(temperature=-0.5), 400, "temperature", None),
    ("temperature_string", CHAT, chat(temperature="hot"), 400, "temperature", "invalid_type"),
    ("top_p_zero", CHAT, chat(top_p=0), 400, "top_p", None),
    ("top_p_above_one", COMP, comp(top_p=1.5), 400, "top_p", None),
    ("top_p_negative", CHAT, chat(top_p=-0.1), 400, "top_p", None),
    ("n_zero", CHAT, chat(n=0), 400, "n", None),
    ("n_too_large", COMP, comp(n=100000), 400, "n", None),
    ("n_float", CHAT, chat(n=1.5), 400, "n", "invalid_type"),
    ("n_times_prompts_too_large", COMP, comp(prompt=["a", "b", "c"], n=100), 400, "n", None),
    ("stream_not_bool", CHAT, chat(stream="yes"), 400, "stream", "invalid_type"),
    ("seed_bool", CHAT, chat(seed=True), 400, "seed", "invalid_type"),
    ("seed_negative", COMP, comp(seed=-3), 400, "seed", None),
    ("stop_too_many", CHAT, chat(stop=[str(i) for i in range(20)]), 400, "stop", None),
    ("stop_wrong_type", COMP, comp(stop=5), 400, "stop", None),
    ("frequency_penalty_range", CHAT, chat(frequency_penalty=3), 400, "frequency_penalty", None),
    ("top_logprobs_without_logprobs", CHAT, chat(top_logprobs=2), 400, "top_logprobs", None),
    ("top_logprobs_too_many", CHAT, chat(logprobs=True, top_logprobs=50), 400, "top_logprobs", None),
    ("completion_logprobs_too_many", COMP, comp(logprobs=50), 400, "logprobs", None),
    ("stream_options_without_stream", CHAT, chat(stream_options={"include_usage": True}), 400, "stream_options", None),
    ("unknown_field", CHAT, chat(frobnicate=1), 400, "frobnicate", "unrecognized_argument"),
    ("logit_bias", CHAT, chat(logit_bias={"5": 10}), 400, "logit_bias", "unsupported_parameter"),
    ("tools_not_a_function", CHAT, chat(tools=[{"type": "retrieval"}]), 400, "tools", "invalid_value"),
    ("tool_choice_unknown_function", CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}],
                                                tool_choice={"type": "function", "function": {"name": "g"}}), 400,
     "tool_choice", "invalid_value"),
    ("prompt_wrong_type", COMP, comp(prompt=5), 400, "prompt", None),
    ("prompt_empty_list", COMP, comp(prompt=[]), 400, "prompt", "invalid_value"),
    ("prompt_empty_token_list", COMP, comp(prompt=[[1, 2], []]), 400, "prompt", "invalid_value"),
    ("prompt_token_out_of_range", COMP, comp(prompt=[1, 2, 10**9]), 400, "prompt", "invalid_value"),
    ("prompt_token_negative", COMP, comp(prompt=[1, -2]), 400, "prompt", None),
    ("suffix", COMP, comp(suffix="end"), 400, "suffix", "unsupported_parameter"),
    ("best_of", COMP, comp(best_of=3), 400, "best_of", "unsupported_parameter"),
    ("detokenize_out_of_range", "/v1/detokenize", {"tokens": [10**9]}, 400, "tokens", None),
    ("tokenize_neither", "/v1/tokenize", {}, 400, "prompt", None),
    ("unknown_route", "/v1/embeddings", {"model": "x", "input": "y"}, 404, None, "not_found"),
]


def _materialize(server, body):
    if callable(body):
        body = body(server)
    if isinstance(body, dict):
        body = json.loads(json.dumps(body).replace('"MODEL"', json.dumps(server.model)))
        return json.dumps(body).encode()
    return body.replace(b'"MODEL"', json.dumps(server.model).encode())


def _max_model_len(server) -> int:
    with server.client() as c:
        return c.get("/v1/models").json()["data"][0]["max_model_len"]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(server, case):
    name, path, body, status, param, code = case
    server.max_model_len = getattr(server, "max_model_len", None) or _max_model_len(server)
    data = _materialize(server, body)
    with server.client() as c:
        r = c.post(path, content=data, headers={"Content-Type": "application/json"})
        assert r.status_code == status, (name, r.status_code, r.text[:500])
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}, err
        assert isinstance(err["message"], str) and err["message"]
        assert err["type"] == "invalid_request_error"
        if param is not None:
            assert err["param"] == param, err
        if code is not None:
            assert err["code"] == code, err
        if name.startswith("prompt_empty"):
            assert err["message"] == "Invalid value for 'prompt': The prompt is empty.", err
        assert c.get("/health").status_code == 200


def test_oversized_chunked_body(server):
    """No Content-Length (chunked upload): the limit is enforced while reading."""
    def chunks():
        yield b'{"model": "x", "messages": [{"role": "user", "content": "'
        for _ in range(BODY_LIMIT // 65536 + 2):
            yield b"a" * 65536
        yield b'"}]}'

    with server.client() as c:
        r = c.post(CHAT, content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413, r.text[:300]
        assert r.json()["error"]["code"] == "request_too_large"
        assert c.get("/health").status_code == 200


def test_wrong_method_and_auth_errors(server):
    with server.client() as c:
        r = c.get(CHAT)
        assert r.status_code == 405 and "error" in r.json()
    with httpx.Client(base_url=server.base) as anon:
        for path in ("/v1/models", "/metrics", "/openapi.json", CHAT):
            r = anon.request("POST" if path == CHAT else "GET", path, json=chat(model=server.model))
            assert r.status_code == 401, path
            assert r.json()["error"]["code"] == "invalid_api_key"
        r = anon.get("/v1/models", headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401
        assert anon.get("/health").status_code == 200


def test_server_survives_and_serves_after_bad_input(server):
    with server.client() as c:
        r = c.post(CHAT, json=chat(model=server.model, max_tokens=3))
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] is not None
    m = server.wait_idle()
    assert m["localsgl_http_requests_pending"] == 0


def test_overload_returns_503_with_retry_after():
    srv = LiveServer(fake_cfg({"max_running": 1, "step_delay": 0.05}, max_queue=2))
    try:
        async def one(client):
            async with client.stream("POST", COMP, json={"model": srv.model, "prompt": "x", "max_tokens": 15,
                                                         "stream": True}) as r:
                body = await r.aread()
                return r.status_code, r.headers.get("retry-after"), body

        async def run():
            async with httpx.AsyncClient(base_url=srv.base, headers=srv.headers, timeout=60) as client:
                return await asyncio.gather(*[one(client) for _ in range(12)])

        results = asyncio.run(run())
        codes = [s for s, _, _ in results]
        assert codes.count(200) >= 2 and codes.count(503) >= 1, codes
        for status, retry, body in results:
            if status == 503:
                assert retry is not None and int(retry) >= 1
                err = json.loads(body)["error"]
                assert err["code"] == "overloaded" and err["type"] == "server_error"
            else:
                assert body.rstrip().endswith(b"data: [DONE]")
        srv.wait_idle()
        with srv.client() as c:
            assert c.get("/health").status_code == 200
            r = c.post(COMP, json={"model": srv.model, "prompt": "x", "max_tokens": 2})
            assert r.status_code == 200
        assert srv.metrics()["localsgl_requests_rejected_overload_total"] >= 1
    finally:
        assert srv.stop() == 0
