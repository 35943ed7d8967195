"""Reasoning kept apart (engine/reasoning.py, server/chat_output.py) on scripted token
streams: a tiny model cannot be relied on to think, so the streams are written out."""
from __future__ import annotations

import random

import pytest

from localsgl.engine.params import InvalidRequestError, SamplingParams
from localsgl.engine.reasoning import ReasoningParser, reasoning_tags, split_reasoning, starts_inside
from localsgl.server.chat_output import ChatOutput
from localsgl.server.tool_calls import ToolFormat, parse_tools

TAGS = ("<think>", "</think>")

SCRIPTS = [
    # (generated text, inside?, reasoning, answer)
    ("<think>\nThe user wants 2+2.\n</think>\n\nIt is 4.", False, "The user wants 2+2.", "It is 4."),
    ("<think></think>Plain.", False, "", "Plain."),
    ("No thinking at all.", False, "", "No thinking at all."),
    ("  <think>a < b, and </thin is not a tag</think>ok", False, "a < b, and </thin is not a tag", "ok"),
    ("<think>never closed because of max_tokens", False, "never closed because of max_tokens", ""),
    ("continuing the prompt's reasoning\n</think>\n\nAnswer.", True, "continuing the prompt's reasoning", "Answer."),
    ("<thinking is not the tag>", False, "", "<thinking is not the tag>"),
    ("<think>\nx\n</think>\n\n{\"a\": 1}", False, "x", "{\"a\": 1}"),
]


def stream(text: str, rng: random.Random) -> list[str]:
    """text cut into random pieces (as tokens and merged SSE chunks cut it)."""
    pieces, i = [], 0
    while i < len(text):
        n = rng.randint(1, 6)
        pieces.append(text[i:i + n])
        i += n
    return pieces


@pytest.mark.parametrize("text, inside, reasoning, answer", SCRIPTS)
def test_split_whole_and_streamed(text, inside, reasoning, answer):
    assert split_reasoning(text, TAGS, inside) == (reasoning, answer)
    rng = random.Random(hash(text) & 0xFFFF)
    for _ in range(30):
        p = ReasoningParser(TAGS, inside)
        got_r = got_a = ""
        for piece in stream(text, rng):
            r, a = p.feed(piece)
            got_r += r
            got_a += a
        r, a = p.flush()
        assert (got_r + r, got_a + a) == (reasoning, answer)


def test_reasoning_never_leaks_a_partial_tag():
    p = ReasoningParser(TAGS)
    out = [p.feed(x) for x in ["<thi", "nk>step one</", "thi", "nk>done"]]
    assert all("<" not in r and "<" not in a for r, a in out)
    assert "".join(r for r, _ in out) == "step one" and "".join(a for _, a in out) == "done"


def test_chat_output_stream_deltas_with_tools():
    """Reasoning first, then a Hermes tool call: reasoning_content deltas, then one tool_calls
    delta, finish_reason tool_calls."""
    tools = parse_tools([{"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}}}])
    text = '<think>\nI should look it up.\n</think>\n\n<tool_call>\n{"name": "lookup", "arguments": {"q": "tides"}}\n</tool_call>'
    for seed in range(20):
        out = ChatOutput(TAGS, False, ToolFormat("hermes", "arguments"), tools)
        deltas = []
        for piece in stream(text, random.Random(seed)):
            deltas += out.feed(piece)
        deltas += out.flush()
        reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
        content = "".join(d.get("content", "") for d in deltas)
        calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
        assert reasoning == "I should look it up." and content.strip() == ""
        assert len(calls) == 1 and calls[0]["index"] == 0 and calls[0]["function"]["name"] == "lookup"
        assert out.finish_reason("stop") == "tool_calls" and out.finish_reason("length") == "length"
    msg = ChatOutput(TAGS, False, ToolFormat("hermes", "arguments"), tools).message(text)
    assert msg["content"] is None and msg["reasoning_content"] == "I should look it up."
    assert msg["tool_calls"][0]["function"]["arguments"] == '{"q": "tides"}'


def test_detection():
    class Tok:
        unk_token_id = 0

        def __init__(self, vocab):
            self.vocab = vocab

        def convert_tokens_to_ids(self, t):
            return self.vocab.get(t, 0)

    assert reasoning_tags(Tok({"<think>": 5, "</think>": 6})) == TAGS
    assert reasoning_tags(Tok({"<think>": 5})) is None
    assert reasoning_tags(None) is None
    assert starts_inside("<|im_start|>assistant\n<think>\n") and not starts_inside("<think>\n\n</think>\n\n")


def test_engine_without_reasoning_tags(engine):
    assert engine.reasoning_tags is None  # SmolLM2 does not think in tags


def test_reasoning_off_reaches_the_template(engine, monkeypatch):
    tok = engine.tokenizer
    monkeypatch.setattr(tok, "chat_template",
                        "{% for m in messages %}{{ m.content }}{% endfor %}|{{ enable_thinking is defined and enable_thinking }}")
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.decode(engine.apply_chat_template(msgs)).endswith("|False")  # auto: the template decides
    assert tok.decode(engine.apply_chat_template(msgs, enable_thinking=True)).endswith("|True")
    monkeypatch.setattr(engine, "reasoning", "off")
    assert tok.decode(engine.apply_chat_template(msgs)).endswith("|False")
    assert tok.decode(engine.apply_chat_template(msgs, enable_thinking=True)).endswith("|True")  # asked explicitly


def test_cli_reasoning_flag_builds_the_engine_with_it(monkeypatch):
    from typer.testing import CliRunner

    from localsgl import cli, cli_run

    seen = {}

    def load(kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(cli_run, "_load_engine", load)
    monkeypatch.setattr(cli_run, "_running_server", lambda kwargs, flags: pytest.fail("a running server was asked"))
    r = CliRunner().invoke(cli.app, ["run", "hi", "--reasoning", "off"])
    assert r.exit_code == 1 and seen["reasoning"] == "off"


def test_reasoning_assigned_later_reaches_the_grammars(engine, monkeypatch):
    """``engine.reasoning`` assigned after start-up changes the tags the grammars are wrapped
    with, wherever they compile (the core's own process too): a prompt that opened a think
    block lets the answer think first; with reasoning off the answer is the regex alone."""
    import localsgl.engine.reasoning as reasoning_module

    prompt = "Question: is the sky blue? Answer yes or no.\n<think>\n"
    params = [SamplingParams(regex="(yes|no)!", max_tokens=6, temperature=1.0, seed=seed) for seed in range(8)]
    try:
        monkeypatch.setattr(reasoning_module, "reasoning_tags", lambda tok: TAGS)  # as if SmolLM2 thought
        engine.reasoning = "auto"
        assert engine.reasoning_tags == TAGS
        texts = [o.text for o in engine.generate([prompt] * 8, params)]
        assert any(t not in ("yes!", "no!") for t in texts), texts  # free text inside the think block
        engine.reasoning = "off"
        assert engine.reasoning_tags is None
        texts = [o.text for o in engine.generate([prompt] * 8, params)]
        assert all(t in ("yes!", "no!") for t in texts), texts
    finally:
        monkeypatch.undo()
        engine.reasoning = "auto"
    assert engine.reasoning_tags is None
    with pytest.raises(InvalidRequestError, match="auto or off"):
        engine.reasoning = "sometimes"
