"""The official openai client against a live `localsgl serve` (fake and real engine)."""
from __future__ import annotations

import openai
import pytest

MSG = [{"role": "user", "content": "Name three colours."}]
PROMPT = "The capital of France is"


def _chat_stream(client, **kw):
    texts, finishes, usage, roles = {}, {}, None, set()
    for ch in client.chat.completions.create(stream=True, **kw):
        if ch.usage is not None:
            usage = ch.usage
        for c in ch.choices:
            if c.delta.role:
                roles.add(c.index)
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    return texts, finishes, usage, roles


def _completion_stream(client, **kw):
    texts, finishes, usage = {}, {}, None
    for ch in client.completions.create(stream=True, **kw):
        if ch.usage is not None:
            usage = ch.usage
        for c in ch.choices:
            texts[c.index] = texts.get(c.index, "") + (c.text or "")
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    return texts, finishes, usage


def test_models(server):
    c = server.openai()
    models = c.models.list().data
    assert [m.id for m in models] == [server.model]
    assert c.models.retrieve(server.model).id == server.model


def test_chat_basic(server):
    c = server.openai()
    r = c.chat.completions.create(model=server.model, messages=MSG, max_tokens=8, temperature=0)
    assert r.object == "chat.completion"
    assert len(r.choices) == 1
    ch = r.choices[0]
    assert ch.message.role == "assistant" and isinstance(ch.message.content, str)
    assert ch.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0
    assert 1 <= r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    if ch.finish_reason == "length":
        assert r.usage.completion_tokens == 8


def test_completion_basic(server):
    c = server.openai()
    r = c.completions.create(model=server.model, prompt=PROMPT, max_tokens=6, temperature=0)
    assert r.object == "text_completion"
    assert r.choices[0].finish_reason in ("stop", "length")
    assert 1 <= r.usage.completion_tokens <= 6
    # greedy is deterministic
    r2 = c.completions.create(model=server.model, prompt=PROMPT, max_tokens=6, temperature=0)
    assert r2.choices[0].text == r.choices[0].text


def test_chat_stream_equals_nonstream(server):
    c = server.openai()
    kw = dict(model=server.model, messages=MSG, max_tokens=16, temperature=0.9, seed=1234)
    r = c.chat.completions.create(**kw)
    texts, finishes, usage, roles = _chat_stream(c, stream_options={"include_usage": True}, **kw)
    assert texts[0] == r.choices[0].message.content
    assert finishes[0] == r.choices[0].finish_reason
    assert roles == {0}
    assert usage is not None and usage.completion_tokens == r.usage.completion_tokens
    assert usage.prompt_tokens == r.usage.prompt_tokens


def test_completion_stream_equals_nonstream(server):
    c = server.openai()
    kw = dict(model=server.model, prompt=PROMPT, max_tokens=16, temperature=0.9, seed=77)
    r = c.completions.create(**kw)
    texts, finishes, usage = _completion_stream(c, stream_options={"include_usage": True}, **kw)
    assert texts[0] == r.choices[0].text
    assert finishes[0] == r.choices[0].finish_reason
    assert usage.completion_tokens == r.usage.completion_tokens


def test_stream_without_usage_has_no_usage_chunk(server):
    c = server.openai()
    chunks = list(c.chat.completions.create(model=server.model, messages=MSG, max_tokens=3, stream=True))
    assert all(ch.usage is None for ch in chunks)
    assert all(len(ch.choices) == 1 for ch in chunks)


def test_n2(server):
    c = server.openai()
    kw = dict(model=server.model, messages=MSG, max_tokens=12, temperature=1.0, seed=5, n=2)
    r = c.chat.completions.create(**kw)
    assert [ch.index for ch in r.choices] == [0, 1]
    texts, finishes, usage, roles = _chat_stream(c, stream_options={"include_usage": True}, **kw)
    assert roles == {0, 1}
    assert texts == {i: r.choices[i].message.content for i in (0, 1)}
    assert usage.completion_tokens == r.usage.completion_tokens
    cr = c.completions.create(model=server.model, prompt=PROMPT, max_tokens=5, n=2, seed=3)
    assert [ch.index for ch in cr.choices] == [0, 1]


def test_completion_prompt_list_and_token_ids(server):
    c = server.openai()
    ids = c.post("/tokenize", body={"prompt": PROMPT}, cast_to=object)["tokens"]
    r_ids = c.completions.create(model=server.model, prompt=ids, max_tokens=5, temperature=0)
    r_txt = c.completions.create(model=server.model, prompt=PROMPT, max_tokens=5, temperature=0)
    assert r_ids.choices[0].text == r_txt.choices[0].text
    assert r_ids.usage.prompt_tokens == len(ids)
    r = c.completions.create(model=server.model, prompt=[PROMPT, "Hello"], max_tokens=4, n=2, seed=4)
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    assert r.usage.prompt_tokens == len(ids) + len(c.post("/tokenize", body={"prompt": "Hello"}, cast_to=object)["tokens"])
    assert r.usage.completion_tokens <= 16


def test_seed_reproducibility(server):
    c = server.openai()
    kw = dict(model=server.model, prompt=PROMPT, max_tokens=16, temperature=1.0)
    a = c.completions.create(seed=42, **kw).choices[0].text
    b = c.completions.create(seed=42, **kw).choices[0].text
    assert a == b
    others = {c.completions.create(seed=s, **kw).choices[0].text for s in (1, 2, 3)}
    assert len(others | {a}) > 1


def test_stop(server):
    c = server.openai()
    kw = dict(model=server.model, prompt=PROMPT, max_tokens=24, temperature=1.0, seed=9, extra_body={"ignore_eos": True})
    full = c.completions.create(**kw).choices[0].text
    assert len(full) >= 8, full
    stop = full[4:6]
    assert stop.strip() or len(stop) == 2
    r = c.completions.create(stop=[stop], **kw)
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[: full.index(stop)]
    # chat: a single stop string
    rc = c.chat.completions.create(model=server.model, messages=MSG, max_tokens=24, seed=9, stop=stop,
                                   extra_body={"ignore_eos": True})
    assert stop not in rc.choices[0].message.content


def test_chat_logprobs(server):
    c = server.openai()
    r = c.chat.completions.create(model=server.model, messages=MSG, max_tokens=6, logprobs=True, top_logprobs=3,
                                  seed=1, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    for t in content:
        assert t.logprob <= 0.0
        assert len(t.top_logprobs) == 3
        assert t.bytes == list(t.token.encode("utf-8", "replace"))
    texts = []
    for ch in c.chat.completions.create(model=server.model, messages=MSG, max_tokens=6, logprobs=True,
                                        top_logprobs=2, seed=1, stream=True, extra_body={"ignore_eos": True}):
        for cc in ch.choices:
            if cc.logprobs and cc.logprobs.content:
                texts.extend(t.token for t in cc.logprobs.content)
    assert texts == [t.token for t in content]


def test_completion_logprobs(server):
    c = server.openai()
    r = c.completions.create(model=server.model, prompt=PROMPT, max_tokens=5, logprobs=2, seed=2,
                             extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert all(len(d) <= 2 for d in lp.top_logprobs)
    assert lp.text_offset == sorted(lp.text_offset)


def test_echo(server):
    c = server.openai()
    r = c.completions.create(model=server.model, prompt=PROMPT, max_tokens=3, echo=True, temperature=0)
    assert r.choices[0].text.startswith(PROMPT)


def test_max_completion_tokens_and_user(server):
    c = server.openai()
    r = c.chat.completions.create(model=server.model, messages=MSG, max_completion_tokens=2, user="alice",
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 2 and r.choices[0].finish_reason == "length"


def test_sampling_extensions(server):
    c = server.openai()
    r = c.chat.completions.create(
        model=server.model, messages=MSG, max_tokens=4, temperature=0.7, top_p=0.9, frequency_penalty=0.5,
        presence_penalty=0.5, seed=3,
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 2},
    )
    assert r.usage.completion_tokens >= 2


def test_multipart_and_system_messages(server):
    c = server.openai()
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Say"}, {"type": "text", "text": "hi"}]}]
    r = c.chat.completions.create(model=server.model, messages=msgs, max_tokens=3)
    assert r.choices[0].message.content is not None


def test_tokenize_detokenize(server):
    with server.client() as h:
        r = h.post("/v1/tokenize", json={"prompt": "Hello world"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["count"] == len(body["tokens"]) > 0
        assert body["max_model_len"] > 0
        d = h.post("/v1/detokenize", json={"tokens": body["tokens"]})
        assert d.status_code == 200
        assert "Hello world" in d.json()["prompt"]
        rc = h.post("/v1/tokenize", json={"messages": MSG})
        assert rc.status_code == 200 and rc.json()["count"] > body["count"]


def test_openai_client_raises_on_bad_request(server):
    c = server.openai()
    with pytest.raises(openai.BadRequestError) as ei:
        c.chat.completions.create(model=server.model, messages=MSG, temperature=-1)
    assert ei.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="no-such-model", messages=MSG)
    with pytest.raises(openai.AuthenticationError):
        server.openai(api_key="wrong").models.list()


def test_metrics(server):
    c = server.openai()
    before = server.metrics()
    c.completions.create(model=server.model, prompt=PROMPT, max_tokens=4, stream=True).close()
    c.completions.create(model=server.model, prompt=PROMPT, max_tokens=4, extra_body={"ignore_eos": True})
    m = server.wait_idle()
    for name in ("localsgl_num_requests_running", "localsgl_num_requests_waiting", "localsgl_kv_usage_ratio",
                 "localsgl_prefix_cache_hit_rate", "localsgl_time_to_first_token_seconds_count",
                 "localsgl_inter_token_latency_seconds_count", "localsgl_e2e_request_latency_seconds_count",
                 "localsgl_prompt_tokens_total", "localsgl_generation_tokens_total", "localsgl_kv_slots_locked"):
        assert name in m, name
    assert m["localsgl_generation_tokens_total"] >= before.get("localsgl_generation_tokens_total", 0) + 4
    assert m["localsgl_prompt_tokens_total"] > before.get("localsgl_prompt_tokens_total", 0)
    assert m["localsgl_time_to_first_token_seconds_count"] > before.get("localsgl_time_to_first_token_seconds_count", 0)
    assert m["localsgl_e2e_request_latency_seconds_count"] > before.get("localsgl_e2e_request_latency_seconds_count", 0)
    assert 0.0 <= m["localsgl_kv_usage_ratio"] <= 1.0
