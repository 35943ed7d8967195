"""HTTP: omitted sampling fields take the served model's defaults (engine.sampling_defaults),
explicit fields win, and an omitted chat max_tokens follows the model's generation_config.json."""
from __future__ import annotations

from fastapi.testclient import TestClient
from fake_engine import FakeEngine

from localsgl.engine.sampling_defaults import BUILTIN_DEFAULTS, resolve_defaults
from localsgl.server import app as server_app

MSG = [{"role": "user", "content": "hello"}]


class RecordingEngine(FakeEngine):
    """FakeEngine with model sampling defaults that records the params each request arrives with."""

    def __init__(self, sampling_defaults=None, **kw):
        super().__init__(**kw)
        if sampling_defaults is not None:
            self.sampling_defaults = sampling_defaults
        self.seen = []

    def submit(self, prompt, params=None, on_delta=None):
        self.seen.append(params)
        return super().submit(prompt, params, on_delta)


def serve(engine):
    return TestClient(server_app.create_app(engine))


def test_omitted_fields_take_the_model_defaults():
    eng = RecordingEngine(resolve_defaults({"temperature": 0.0, "top_k": 7}), max_model_len=128)
    try:
        with serve(eng) as c:
            texts = []
            for _ in range(2):
                r = c.post("/v1/chat/completions", json={"model": "fake-echo", "messages": MSG, "max_tokens": 8})
                assert r.status_code == 200, r.text
                texts.append(r.json()["choices"][0]["message"]["content"])
            p = eng.seen[-1]
            assert p.temperature == 0.0 and p.top_k == 7  # the model's
            assert p.top_p == 0.95 and p.min_p == 0.05 and p.repetition_penalty == 1.0  # llama.cpp's
            assert p.unset_fields() == []
            assert texts[0] == texts[1]  # greedy: the fake engine answers deterministically

            r = c.post("/v1/completions", json={"model": "fake-echo", "prompt": "hi", "max_tokens": 4})
            assert r.status_code == 200, r.text
            assert eng.seen[-1].temperature == 0.0 and eng.seen[-1].max_tokens == 4

            # explicit values win, including the neutral ones (top_k 0 = off)
            r = c.post("/v1/chat/completions", json={"model": "fake-echo", "messages": MSG, "max_tokens": 4,
                                                     "temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": 3})
            assert r.status_code == 200, r.text
            p = eng.seen[-1]
            assert (p.temperature, p.top_k, p.top_p, p.min_p, p.seed) == (1.0, -1, 1.0, 0.05, 3)
    finally:
        eng.shutdown()


def test_engine_without_defaults_gets_llama_cpp_values():
    eng = RecordingEngine(max_model_len=64)
    try:
        with serve(eng) as c:
            r = c.post("/v1/completions", json={"model": "fake-echo", "prompt": "hi"})
            assert r.status_code == 200, r.text
            p = eng.seen[-1]
            assert p.max_tokens == 16  # OpenAI's completions default, not a sampling default
            assert {f: getattr(p, f) for f in BUILTIN_DEFAULTS if f != "max_tokens"} == {
                f: v for f, (v, _) in BUILTIN_DEFAULTS.items() if f != "max_tokens"}
    finally:
        eng.shutdown()


def test_omitted_chat_max_tokens_runs_to_the_context_or_the_generation_config():
    body = {"model": "fake-echo", "messages": MSG, "ignore_eos": True}
    eng = RecordingEngine(resolve_defaults({}), max_model_len=400)  # no generation_config.json
    try:
        with serve(eng) as c:
            r = c.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            usage = r.json()["usage"]
            assert usage["prompt_tokens"] + usage["completion_tokens"] == 400  # not the CLI's 256
    finally:
        eng.shutdown()
    eng = RecordingEngine(resolve_defaults({"max_tokens": 20}), max_model_len=64)
    try:
        with serve(eng) as c:
            r = c.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 20
            r = c.post("/v1/chat/completions", json={**body, "max_tokens": 5})
            assert r.json()["usage"]["completion_tokens"] == 5
    finally:
        eng.shutdown()
