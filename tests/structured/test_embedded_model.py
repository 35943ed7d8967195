"""Structured output through the public API with the embedded model: regex, Lark and GBNF
outputs fully match; n > 1, stop strings and streaming; a mixed batch leaves the free
requests' greedy text unchanged; invalid constraints are refused before anything is queued
(and `localsgl run` exits 2)."""
from __future__ import annotations

import json
import re

import pytest

from localsgl import SamplingParams
from localsgl.engine.params import InvalidRequestError

FREE_PROMPTS = ["The capital of France is", "Water boils at", "My favourite colour is"]


@pytest.mark.parametrize("kw, pattern", [
    (dict(regex=r"[0-9]{3}-[0-9]{4}"), r"[0-9]{3}-[0-9]{4}"),
    (dict(regex=r"(yes|no), because [a-z ]{1,30}\."), r"(yes|no), because [a-z ]{1,30}\."),
    (dict(grammar='start: "[" ITEM ("," ITEM){1,3} "]"\nITEM: /[a-z]{2,8}/'), r"\[[a-z]{2,8}(,[a-z]{2,8}){1,3}\]"),
    (dict(grammar='root ::= "The answer is " [0-9] [0-9]? "."'), r"The answer is [0-9][0-9]?\."),
])
def test_regex_lark_gbnf_fully_match(engine, kw, pattern):
    outs = engine.generate(["Answer:", "Reply now:"], [SamplingParams(temperature=t, seed=1, max_tokens=48, **kw)
                                                     for t in (0.0, 1.0)])
    for o in outs:
        assert o.finish_reason == "stop", o.text
        assert re.fullmatch(pattern, o.text), o.text


def test_mixed_batch_leaves_free_greedy_text_unchanged(engine):
    free = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = engine.generate(FREE_PROMPTS, free)
    schema = {"type": "object", "properties": {"v": {"type": "integer", "maximum": 999}}, "required": ["v"],
              "additionalProperties": False}
    mixed_prompts = FREE_PROMPTS + ["JSON:", "More JSON:", "Digits:"]
    mixed = engine.generate(mixed_prompts, [free] * 3 + [SamplingParams(json_schema=schema, temperature=0, max_tokens=20),
                                                         SamplingParams(json_schema=schema, temperature=1, max_tokens=20),
                                                         SamplingParams(regex="[0-9]{4}", temperature=0)])
    assert [o.text for o in mixed[:3]] == [o.text for o in alone]
    assert [o.token_ids for o in mixed[:3]] == [o.token_ids for o in alone]
    json.loads(mixed[3].text)


def test_n_choices_each_follow_the_grammar(engine):
    schema = {"type": "object", "properties": {"animal": {"type": "string", "maxLength": 10},
                                               "legs": {"type": "integer", "minimum": 0, "maximum": 8}},
              "required": ["animal", "legs"], "additionalProperties": False}
    o = engine.generate("An animal as JSON:", SamplingParams(json_schema=schema, n=4, temperature=1.0, seed=11,
                                                             max_tokens=40))
    assert len(o.choices) == 4
    for c in o.choices:
        assert c.finish_reason == "stop", c.text
        v = json.loads(c.text)
        assert 0 <= v["legs"] <= 8
    assert len({c.text for c in o.choices}) > 1


def test_stop_string_cuts_a_constrained_output(engine):
    o = engine.generate("Count:", SamplingParams(regex=r"[0-9]{2}(, [0-9]{2}){5}", stop=[", "], temperature=0))
    assert o.finish_reason == "stop"
    assert re.fullmatch(r"[0-9]{2}", o.text), o.text


def test_streamed_equals_whole(engine):
    params = SamplingParams(json_schema={"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"],
                                         "additionalProperties": False},
                            temperature=0, max_tokens=20)
    whole = engine.generate("Flag:", params)
    deltas = list(engine.stream("Flag:", params))
    assert "".join(d.text for d in deltas) == whole.text
    assert deltas[-1].finish_reason == whole.finish_reason == "stop"
    assert [t for d in deltas for t in d.token_ids] == whole.token_ids


@pytest.mark.parametrize("kw, field", [
    (dict(json_schema={"type": "object", "properties": {"a": {"type": "nope"}}}), "json_schema"),
    (dict(regex="[unclosed"), "regex"),
    (dict(grammar="start: missing_rule"), "grammar"),
    (dict(grammar='root ::= "a" | ( '), "grammar"),
])
def test_invalid_constraints_refused_before_admission(engine, kw, field):
    before = engine.stats()
    with pytest.raises(InvalidRequestError) as e:
        engine.submit("hi", SamplingParams(max_tokens=4, **kw))
    assert e.value.param == field
    after = engine.stats()
    assert after["prompt_tokens_total"] == before["prompt_tokens_total"]  # nothing was queued


def test_cli_run_structured_flags(engine, monkeypatch, tmp_path):
    """`localsgl run --json-schema/--regex/--grammar`: answers that follow them; invalid
    ones exit 2 with the problem named."""
    from typer.testing import CliRunner

    from localsgl import cli, cli_run

    monkeypatch.setattr(cli_run, "_load_engine", lambda kwargs: _Borrowed(engine))
    monkeypatch.setattr(cli_run, "_running_server", lambda kwargs, flags: None)
    runner = CliRunner()
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}))
    r = runner.invoke(cli.app, ["run", "Is it ok?", "--json-schema", f"@{schema}", "--temperature", "0",
                                "--max-tokens", "20"])
    assert r.exit_code == 0, r.output
    assert isinstance(json.loads(r.stdout)["ok"], bool)
    r = runner.invoke(cli.app, ["run", "Digits?", "--regex", "[0-9]{5}", "--temperature", "0"])
    assert r.exit_code == 0 and re.fullmatch(r"[0-9]{5}\n", r.stdout), r.output
    grammar = tmp_path / "g.gbnf"
    grammar.write_text('root ::= "alpha" | "beta"\n')
    r = runner.invoke(cli.app, ["run", "Pick", "--grammar", f"@{grammar}", "--temperature", "0"])
    assert r.exit_code == 0 and r.stdout.strip() in ("alpha", "beta"), r.output
    r = runner.invoke(cli.app, ["run", "x", "--json-schema", '{"type": "wrong"}'])
    assert r.exit_code == 2 and "json_schema" in r.stderr and "wrong" in r.stderr
    r = runner.invoke(cli.app, ["run", "x", "--regex", "a(("])
    assert r.exit_code == 2 and "regex" in r.stderr


def test_cli_json_pretty_reaches_the_params(engine, monkeypatch):
    """`--json-pretty` asks for pretty JSON (in-process and through a running server's client);
    without --json-schema it is a usage error."""
    from typer.testing import CliRunner

    from localsgl import cli, cli_run
    from localsgl.client import request_fields

    seen = []
    validate = SamplingParams.validate

    def spy(self):
        seen.append(self.json_whitespace)
        return validate(self)

    monkeypatch.setattr(SamplingParams, "validate", spy)
    monkeypatch.setattr(cli_run, "_load_engine", lambda kwargs: _Borrowed(engine))
    monkeypatch.setattr(cli_run, "_running_server", lambda kwargs, flags: None)
    runner = CliRunner()
    schema = json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]})
    r = runner.invoke(cli.app, ["run", "Is it ok?", "--json-schema", schema, "--json-pretty", "--temperature", "0",
                                "--max-tokens", "30"])
    assert r.exit_code == 0, r.output
    assert isinstance(json.loads(r.stdout)["ok"], bool)
    assert seen and seen[0] == "pretty"
    r = runner.invoke(cli.app, ["run", "x", "--json-pretty"])
    assert r.exit_code == 2 and "--json-pretty" in r.stderr
    assert request_fields(SamplingParams(json_schema={"type": "object"}, json_whitespace="pretty"))[
        "json_whitespace"] == "pretty"
    assert "json_whitespace" not in request_fields(SamplingParams(json_schema={"type": "object"}))


class _Borrowed:
    """The session engine, not shut down by the command."""

    def __init__(self, eng):
        self._eng = eng

    def __getattr__(self, name):
        return getattr(self._eng, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
