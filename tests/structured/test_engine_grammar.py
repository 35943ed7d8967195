"""The engine core with grammars: a tiny random model with the embedded model's vocabulary and
tokenizer, so outputs are whatever the grammar lets a random model say.

Outputs are the same with and without overlap scheduling, under retraction (a tiny KV pool)
and without the radix cache; every output matches its grammar; free requests in the batch
are unaffected; forced tokens save steps; a grammar that cannot continue ends the request
with finish_reason "grammar_error" and its KV goes back."""
from __future__ import annotations

import json
import re
import sys
import threading

import pytest
import torch

from localsgl.engine.core import CoreConfig, EngineCore
from localsgl.engine.grammar import FINISH_GRAMMAR, GrammarState
from localsgl.engine.params import SamplingParams
from localsgl.engine.request import Request

sys.path.insert(0, "tests")
from tiny import tiny_model  # noqa: E402

VOCAB = 49152
EOS = 2

CHOICE = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "ok": {"type": "boolean"}},
          "required": ["color", "n", "ok"], "additionalProperties": False}
LONG_KEYS = {"type": "object", "properties": {"the_first_rather_long_property_name": {"type": "boolean"},
                                              "another_quite_long_property_name_here": {"enum": ["a", "b"]}},
             "required": ["the_first_rather_long_property_name", "another_quite_long_property_name_here"],
             "additionalProperties": False}
WORDS = r"[a-z]{1,5}( [a-z]{1,5}){0,3}\."
TUPLE = 'start: "(" NUM ("," NUM){0,3} ")"\nNUM: /[0-9]{1,3}/'
YESNO = 'root ::= "yes" | "no" | "maybe"'


def check(kind: str, text: str) -> None:
    if kind == "json":
        v = json.loads(text)
        assert set(v) == {"color", "n", "ok"} and v["color"] in ("red", "green", "blue") and 0 <= v["n"] <= 99
    elif kind == "long":
        v = json.loads(text)
        assert v["another_quite_long_property_name_here"] in ("a", "b")
    elif kind == "regex":
        assert re.fullmatch(WORDS, text), text
    elif kind == "lark":
        assert re.fullmatch(r"\([0-9]{1,3}(,[0-9]{1,3}){0,3}\)", text), text
    else:
        assert text in ("yes", "no", "maybe"), text


CASES = [("json", dict(json_schema=CHOICE)), ("regex", dict(regex=WORDS)), ("lark", dict(grammar=TUPLE)),
         ("gbnf", dict(grammar=YESNO)), ("long", dict(json_schema=LONG_KEYS))]


@pytest.fixture(scope="module")
def model():
    return tiny_model(vocab=VOCAB, hidden=32, layers=2, seed=3)


def make_core(model, tokenizer, overlap=False, kv_tokens=4096, disable_radix_cache=False, max_running=16):
    return EngineCore(model, tokenizer, [EOS], torch.device("cpu"),
                      CoreConfig(kv_tokens=kv_tokens, max_running=max_running, chunk_size=64, max_model_len=256,
                                 attention_backend="torch", disable_radix_cache=disable_radix_cache),
                      overlap=overlap)


def run(core, backend, jobs, timeout=300.0):
    """jobs: [(prompt ids, SamplingParams, constrained?)] all at once -> [(text, token ids, finish)]."""
    got: dict[int, tuple] = {}
    done = threading.Event()
    reqs = []
    for i, (prompt, params, constrained) in enumerate(jobs):
        parts: list = [[], []]

        def cb(d, i=i, parts=parts):
            parts[0].append(d.text)
            parts[1].extend(d.token_ids)
            if d.finish_reason is not None:
                got[i] = ("".join(parts[0]), parts[1], d.finish_reason, d.extra.get("error"))
                if len(got) == len(jobs):
                    done.set()

        r = Request(f"g{i}", prompt, params, 0, cb)
        if constrained:
            r.grammar = backend.compile(params).new_state()
        reqs.append([r])
    core.add_many(reqs)
    assert done.wait(timeout), f"only {len(got)} of {len(jobs)} finished"
    assert core.wait_idle(30)
    core.scheduler.check_idle_invariants()
    return [got[i] for i in range(len(jobs))]


def jobs_for(tokenizer, free: int = 3):
    jobs = []
    for k, (kind, kw) in enumerate(CASES * 2):
        prompt = tokenizer.encode(f"Case {k}: give the answer", add_special_tokens=False)
        jobs.append((prompt, SamplingParams(temperature=0.0, max_tokens=60, **kw), True))
    for k in range(free):
        prompt = tokenizer.encode(f"Free text number {k} goes here", add_special_tokens=False)
        jobs.append((prompt, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True), False))
    return jobs


@pytest.fixture(scope="module")
def reference(model, tokenizer, backend):
    core = make_core(model, tokenizer)
    try:
        return run(core, backend, jobs_for(tokenizer))
    finally:
        core.shutdown()


def test_outputs_match_their_grammars(reference):
    kinds = [k for k, _ in CASES * 2]
    for kind, (text, toks, finish, err) in zip(kinds, reference):
        assert finish == "stop", (kind, text, finish, err)
        check(kind, text)


@pytest.mark.parametrize("variant", ["overlap", "retraction", "no_radix_cache"])
def test_same_outputs_under_overlap_retraction_and_without_cache(model, tokenizer, backend, reference, variant):
    kw = {"overlap": dict(overlap=True), "retraction": dict(kv_tokens=100, max_running=16),
          "no_radix_cache": dict(disable_radix_cache=True)}[variant]
    core = make_core(model, tokenizer, **kw)
    try:
        got = run(core, backend, jobs_for(tokenizer))
        if variant == "retraction":
            assert core.stats()["retractions_total"] > 0
    finally:
        core.shutdown()
    assert [g[:3] for g in got] == [r[:3] for r in reference]


def test_free_requests_unaffected_by_constrained_ones(model, tokenizer, backend, reference):
    core = make_core(model, tokenizer)
    try:
        alone = run(core, backend, [j for j in jobs_for(tokenizer) if not j[2]])
    finally:
        core.shutdown()
    assert [a[:3] for a in alone] == [r[:3] for r in reference[-len(alone):]]


def test_forced_tokens_take_no_step_each(model, tokenizer, backend):
    core = make_core(model, tokenizer)
    try:
        prompt = tokenizer.encode("Long keys:", add_special_tokens=False)
        before = core.steps
        [(text, toks, finish, _)] = run(core, backend, [(prompt, SamplingParams(json_schema=LONG_KEYS, temperature=0,
                                                                                  max_tokens=80), True)])
        steps = core.steps - before
    finally:
        core.shutdown()
    check("long", text)
    assert finish == "stop"
    assert steps < len(toks) / 2, (steps, len(toks))  # the long keys come in as forced tokens


class _RefusingState(GrammarState):
    """A grammar state that refuses the third output token (as a grammar with no way on
    would): the failure is recorded where llguidance would record it."""

    def consume(self, tokens):
        for t in tokens:
            if self.consumed == 2 and self.end_at is None:
                self.end_at, self.end_error = 2, "scripted refusal"
                self.consumed += 1
            else:
                super().consume([t])


@pytest.mark.parametrize("overlap", [False, True])
def test_grammar_that_cannot_continue_ends_the_request(model, tokenizer, backend, overlap):
    core = make_core(model, tokenizer, overlap=overlap)
    prompt = tokenizer.encode("words:", add_special_tokens=False)
    params = SamplingParams(regex="[a-z]{1,40}", temperature=0, max_tokens=30)
    got: dict = {}
    done = threading.Event()

    def cb(d):
        got.setdefault("toks", []).extend(d.token_ids)
        if d.finish_reason:
            got["finish"], got["error"] = d.finish_reason, d.extra.get("error")
            done.set()

    r = Request("bad", prompt, params, 0, cb)
    r.grammar = _RefusingState(backend, backend.compile(params).template.deep_copy())
    core.add([r])
    try:
        assert done.wait(120)
        assert core.wait_idle(30)
        core.scheduler.check_idle_invariants()
    finally:
        core.shutdown()
    assert got["finish"] == FINISH_GRAMMAR and "scripted refusal" in got["error"]
    assert len(got["toks"]) == 2  # the refused token is not part of the output


def test_failing_mask_preparation_fails_only_constrained_rows(model, tokenizer, backend, reference):
    core = make_core(model, tokenizer)

    def fault(point, reqs):
        if point == "grammar":
            raise RuntimeError("injected")

    core.fault = fault
    try:
        jobs = jobs_for(tokenizer, free=2)[-4:]  # two constrained, two free
        got = run(core, backend, jobs)
    finally:
        core.shutdown()
    free_reference = iter(reference[-3:])
    for (_, _, constrained), (text, toks, finish, err) in zip(jobs, got):
        if constrained:
            assert finish == "error" and "injected" in err
        else:  # the other rows keep their own logits
            assert (text, toks, finish) == next(free_reference)[:3]


def test_out_of_memory_retry_keeps_matchers_in_step(model, tokenizer, backend, reference):
    """A forward that runs out of memory is retried smaller: the grammar work already done for
    it (tokens fed, forced tokens chosen) must not run ahead of the output."""
    core = make_core(model, tokenizer)
    fired = []

    def fault(point, reqs):
        if point == "forward" and len(fired) < 3 and any(r.grammar is not None and r.output_ids for r in reqs):
            fired.append(point)
            raise torch.OutOfMemoryError("injected")

    core.fault = fault
    try:
        got = run(core, backend, jobs_for(tokenizer))
    finally:
        core.shutdown()
    assert len(fired) == 3 and core.oom_retries == 3
    assert [g[:3] for g in got] == [r[:3] for r in reference]
