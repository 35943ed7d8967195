"""A failing step fails small: an exception at one point of a step ends (finish_reason
"error", with its message) only the requests that point worked on, gives their KV back, and
the engine keeps serving; a device out-of-memory error first retries at a smaller size."""
from __future__ import annotations

import random
import threading

import pytest
import torch

from localsgl.engine.params import SamplingParams
from localsgl.engine.request import Request
from tiny import tiny_core


def _prompts(n, seed=3):
    rng = random.Random(seed)
    return [[rng.randrange(63) for _ in range(rng.randrange(4, 30))] for _ in range(n)]


def _params(n, max_tokens=12):
    return [SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True) for _ in range(n)]


def _run(core, prompts, params, tag="f", timeout=120.0, on_delta=None):
    """Submit all at once; return {i: dict(tokens, reason, error, metrics)} once all finished,
    after checking the core is idle with every slot free or cached and no radix node locked."""
    got, done = {}, threading.Event()

    def cb_for(i):
        toks = []

        def cb(d):
            if on_delta is not None:
                on_delta(i, d)
            toks.extend(d.token_ids)
            if d.finish_reason is not None:
                got[i] = dict(tokens=toks, reason=d.finish_reason, error=d.extra.get("error"), metrics=d.metrics)
                if len(got) == len(prompts):
                    done.set()
        return cb

    core.add_many([[Request(f"{tag}{i}", p, sp, 0, cb_for(i))] for i, (p, sp) in enumerate(zip(prompts, params))])
    assert done.wait(timeout), f"only {len(got)} of {len(prompts)} finished"
    assert core.wait_idle(30)
    core.scheduler.check_idle_invariants()
    return got


def _clean_outputs(prompts, params, **kw):
    core = tiny_core(**kw)
    try:
        return {i: o["tokens"] for i, o in _run(core, prompts, params, tag="c").items()}
    finally:
        core.shutdown()


def _still_answers(core):
    out = _run(core, [[1, 2, 3]], [SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)], tag="after")
    assert out[0]["reason"] == "length" and len(out[0]["tokens"]) == 4


class Once:
    """A fault hook that raises at `point` the `nth` time a call there includes request `rid`;
    it remembers the requests of the call it raised in."""

    def __init__(self, point, rid, nth=1, exc=RuntimeError("injected fault")):
        self.point, self.rid, self.nth, self.exc = point, rid, nth, exc
        self.seen = 0
        self.hit: list[str] | None = None

    def __call__(self, point, reqs):
        if point != self.point or self.hit is not None or not any(r.rid == self.rid for r in reqs):
            return
        self.seen += 1
        if self.seen == self.nth:
            self.hit = [r.rid for r in reqs]
            raise self.exc


KW = dict(kv_tokens=512, max_running=8, chunk_size=24, max_model_len=128)


@pytest.mark.parametrize("point,nth", [("schedule", 2), ("forward", 1), ("forward", 3), ("commit", 2),
                                       ("resolve", 2)])
@pytest.mark.parametrize("overlap", [False, True])
def test_batch_fault_fails_only_that_batch(point, nth, overlap):
    prompts, params = _prompts(10), _params(10)
    clean = _clean_outputs(prompts, params, overlap=overlap, **KW)
    core = tiny_core(overlap=overlap, **KW)
    try:
        core.fault = hook = Once(point, "f4", nth)
        out = _run(core, prompts, params)
        assert hook.hit, "the fault never fired"
        failed = {f"f{i}" for i, o in out.items() if o["reason"] == "error"}
        assert "f4" in failed and failed <= set(hook.hit), (failed, hook.hit)
        for i, o in out.items():
            if o["reason"] == "error":
                assert o["error"] == "RuntimeError: injected fault"
            else:  # untouched requests are exactly what a run without the fault gives
                assert o["reason"] == "length" and o["tokens"] == clean[i], i
        _still_answers(core)
    finally:
        core.shutdown()


@pytest.mark.parametrize("point", ["sample", "detokenize"])
@pytest.mark.parametrize("overlap", [False, True])
def test_one_requests_own_failure_fails_only_it(point, overlap):
    """Its sampling or its detokenizer raises: the batch goes on, one request ends."""
    prompts, params = _prompts(8), _params(8)
    clean = _clean_outputs(prompts, params, overlap=overlap, **KW)
    core = tiny_core(overlap=overlap, **KW)
    try:
        def hook(p, reqs):
            if p == point and any(r.rid == "f2" and sum(t >= 0 for t in r.output_ids) >= 3 for r in reqs):
                raise ValueError("bad request f2")

        core.fault = hook
        out = _run(core, prompts, params)
        assert out[2]["reason"] == "error" and out[2]["error"] == "ValueError: bad request f2"
        assert 2 <= len(out[2]["tokens"]) <= 4  # it failed at its third or fourth token
        for i, o in out.items():
            if i != 2:
                assert o["reason"] == "length" and o["tokens"] == clean[i], i
        _still_answers(core)
    finally:
        core.shutdown()


def test_broken_callback_fails_only_its_request():
    prompts, params = _prompts(6), _params(6, max_tokens=20)
    core = tiny_core(**KW)
    calls = {}

    def on_delta(i, d):
        calls[i] = calls.get(i, 0) + 1
        if i == 1 and calls[i] == 3:
            raise RuntimeError("consumer went away")

    try:
        out = _run(core, prompts, params, on_delta=on_delta)
        assert out[1]["reason"] == "error" and "consumer went away" in out[1]["error"]
        assert len(out[1]["tokens"]) < 20
        assert all(o["reason"] == "length" and len(o["tokens"]) == 20 for i, o in out.items() if i != 1)
    finally:
        core.shutdown()


@pytest.mark.parametrize("overlap", [False, True])
def test_out_of_memory_retries_smaller(overlap):
    """The 'device' cannot run steps of more than 6 tokens: the engine shrinks its steps
    instead of failing anyone, and the outputs are those of an unconstrained run."""
    prompts, params = _prompts(10), _params(10, max_tokens=16)
    clean = _clean_outputs(prompts, params, overlap=overlap, **KW)
    core = tiny_core(overlap=overlap, **KW)
    try:
        def hook(point, reqs):
            if point == "forward" and sum(r.pending for r in reqs) > 6:
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")

        core.fault = hook
        out = _run(core, prompts, params, timeout=240)
        assert all(o["reason"] == "length" for o in out.values()), {i: o["error"] for i, o in out.items()}
        assert {i: o["tokens"] for i, o in out.items()} == clean
        assert core.oom_retries > 0
        _still_answers(core)
    finally:
        core.shutdown()


def test_out_of_memory_at_one_token_fails_the_request():
    """An out-of-memory error that no smaller step avoids ends the request it hits."""
    prompts, params = _prompts(4), _params(4)
    core = tiny_core(**KW)
    try:
        def hook(point, reqs):
            if point == "forward" and any(r.rid == "f0" and r.output_ids for r in reqs):
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")

        core.fault = hook
        out = _run(core, prompts, params)
        assert out[0]["reason"] == "error" and "OutOfMemoryError" in out[0]["error"]
        assert all(out[i]["reason"] == "length" for i in (1, 2, 3))
        _still_answers(core)
    finally:
        core.shutdown()


def test_unresolved_placeholders_are_freed_not_cached():
    """Overlap: a request failed while its sampled token is still a placeholder (whose KV the
    next step computed) gives that KV back to the pool; the radix cache never holds a negative id."""
    prompts, params = _prompts(6), _params(6, max_tokens=10)
    core = tiny_core(overlap=True, **KW)
    try:
        core.fault = Once("resolve", "f0", 3)
        out = _run(core, prompts, params)
        assert out[0]["reason"] == "error"
        for node in core.cache._iter_nodes():
            assert all(t >= 0 for t in node.key)
    finally:
        core.shutdown()


def test_generate_output_carries_the_error_message():
    from localsgl.engine.api import _Collector
    from localsgl.engine.params import StreamDelta

    col = _Collector(2)
    col(StreamDelta(0, "x", [5], None))
    col(StreamDelta(1, "y", [6], "stop"))
    col(StreamDelta(0, "", [], "error", None, None, {"error": "RuntimeError: injected fault"}))
    out = col.result("r", [1, 2], False)
    assert out.finish_reason == "error" and out.error == "RuntimeError: injected fault"
    assert out.choices[0].error == out.error and out.choices[1].error is None
