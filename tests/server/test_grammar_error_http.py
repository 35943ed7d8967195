"""A choice that ends with finish_reason "grammar_error" says why over HTTP: the choice's
``grammar_error`` field holds the engine's message, whole and streamed, on both endpoints
(the fake engine refuses REFUSED_REGEX after two tokens with "scripted refusal")."""
import json

from fake_engine import REFUSED_REGEX


def _events(resp) -> list[dict]:
    return [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]


def test_grammar_error_says_why(fake_server):
    body = {"model": "fake-echo", "max_tokens": 20, "regex": REFUSED_REGEX}
    with fake_server.client() as c:
        chat = c.post("/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": "hi"}]})
        comp = c.post("/v1/completions", json={**body, "prompt": "hi"})
        free = c.post("/v1/completions", json={**body, "regex": None, "prompt": "hi"})
        with c.stream("POST", "/v1/chat/completions",
                      json={**body, "stream": True, "messages": [{"role": "user", "content": "hi"}]}) as s:
            streamed = _events(s)
    for r in (chat, comp):
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "grammar_error" and choice["grammar_error"] == "scripted refusal"
    assert free.status_code == 200 and "grammar_error" not in free.json()["choices"][0]
    last = [e["choices"][0] for e in streamed if e["choices"] and e["choices"][0]["finish_reason"]]
    assert last == [{**last[0], "finish_reason": "grammar_error", "grammar_error": "scripted refusal"}]
    assert all("grammar_error" not in e["choices"][0] for e in streamed if e["choices"] and not e["choices"][0]["finish_reason"])
