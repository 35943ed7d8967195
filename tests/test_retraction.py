"""Fair retraction: under a KV pool so small that retraction happens all the time, every
request still finishes with its full output — the one an unpressured run gives — and none is
retracted more than PROTECT_AFTER_RETRACTIONS times."""
from __future__ import annotations

import random
import threading

import pytest
import torch

from localsgl.engine.kv_pool import KVPool, ReqToTokenPool
from localsgl.engine.params import SamplingParams
from localsgl.engine.radix_cache import RadixCache
from localsgl.engine.request import Request
from localsgl.engine.scheduler import (
    MIN_NEW_TOKEN_RATIO,
    NEW_TOKEN_RATIO_DECAY,
    PROTECT_AFTER_RETRACTIONS,
    Scheduler,
)
from tiny import tiny_core

MAX_LEN = 64


def _workload(n, seed):
    """n requests of up to MAX_LEN tokens each (prompt + output), long outputs, ignore_eos."""
    rng = random.Random(seed)
    prompts, params = [], []
    for _ in range(n):
        p = [rng.randrange(63) for _ in range(rng.randrange(4, 20))]
        prompts.append(p)
        params.append(SamplingParams(temperature=0.0, ignore_eos=True,
                                     max_tokens=rng.randrange(MAX_LEN // 2, MAX_LEN - len(p))))
    return prompts, params


def _run(core, prompts, params, timeout=240.0):
    got, done = {}, threading.Event()

    def cb_for(i):
        toks = []

        def cb(d):
            toks.extend(d.token_ids)
            if d.finish_reason is not None:
                got[i] = (toks, d.finish_reason, d.metrics.retractions)
                if len(got) == len(prompts):
                    done.set()
        return cb

    core.add_many([[Request(f"q{i}", p, sp, 0, cb_for(i))] for i, (p, sp) in enumerate(zip(prompts, params))])
    assert done.wait(timeout), f"only {len(got)} of {len(prompts)} finished"
    assert core.wait_idle(30)
    core.scheduler.check_idle_invariants()
    return got


@pytest.mark.parametrize("radix,overlap", [(True, False), (False, False), (True, True)])
def test_constant_retraction_finishes_everything_fairly(radix, overlap):
    prompts, params = _workload(16, seed=7 + overlap + 2 * radix)
    kw = dict(max_running=16, chunk_size=32, max_model_len=MAX_LEN, disable_radix_cache=not radix, overlap=overlap)
    roomy = tiny_core(kv_tokens=4096, **kw)
    try:
        expected = {i: toks for i, (toks, _, _) in _run(roomy, prompts, params).items()}
        assert roomy.scheduler.retractions_total == 0
    finally:
        roomy.shutdown()
    tight = tiny_core(kv_tokens=MAX_LEN + 8, **kw)  # barely one max-length request
    try:
        got = _run(tight, prompts, params)
        assert tight.scheduler.retractions_total >= len(prompts) // 2, "the pool never got tight"
        for i, (toks, reason, retractions) in got.items():
            assert reason == "length" and len(toks) == params[i].max_tokens, i
            assert toks == expected[i], i
            assert retractions <= PROTECT_AFTER_RETRACTIONS, (i, retractions)
    finally:
        tight.shutdown()


# ---------------------------------------------------------------- the scheduler's rules, one by one
def _scheduler(kv_tokens=64, max_running=8):
    kv = KVPool(kv_tokens, 1, 1, 2, torch.float32, "cpu")
    return Scheduler(kv, ReqToTokenPool(max_running, 128, "cpu"), RadixCache(kv), max_running, 32, 128)


def _req(rid, prompt_len, out_len=0, retractions=0):
    r = Request(rid, list(range(prompt_len)), SamplingParams(max_tokens=100, ignore_eos=True))
    r.output_ids = list(range(out_len))
    r.metrics.retractions = retractions
    return r


def test_victims_go_least_output_first_then_longest_prompt_protected_last():
    s = _scheduler()
    reqs = [_req("a", 10, 5), _req("b", 30, 2), _req("c", 40, 2), _req("d", 5, 0, retractions=PROTECT_AFTER_RETRACTIONS),
            _req("e", 5, 9)]
    for r in reqs:
        s.add(r)
    order = [r.rid for r in sorted(reqs, key=s._victim_key)]
    assert order == ["c", "b", "a", "e", "d"]


def test_retracted_requests_return_to_the_front_in_arrival_order():
    s = _scheduler()
    reqs = [_req(f"r{i}", 4) for i in range(6)]
    for r in reqs:
        s.add(r)
    s.waiting.clear()
    s.waiting.extend([reqs[5]])  # never retracted: stays behind every retracted request
    for i in (3, 1, 4):
        reqs[i].metrics.retractions = 1
        s._requeue_front(reqs[i])
    reqs[2].metrics.retractions = PROTECT_AFTER_RETRACTIONS  # protected: ahead of the others
    s._requeue_front(reqs[2])
    assert [r.rid for r in s.waiting] == ["r2", "r1", "r3", "r4", "r5"]


def _simulate(s, reqs, max_steps=5000):
    """Drive the scheduler without a model: every sampled row gets token 1.  Yields after each step."""
    for r in reqs:
        s.add(r)
    for _ in range(max_steps):
        if not s.has_work():
            return
        sb = s.schedule()
        if sb is not None:
            s.commit(sb)
            for r, smp in zip(sb.reqs, sb.sample):
                if smp:
                    r.output_ids.append(1)
                    if len(r.output_ids) >= r.params.max_tokens:
                        s.finish(r, "length")
        yield sb
    raise AssertionError("the scheduler made no progress")


def test_new_token_ratio_rises_after_retraction_and_decays_back():
    s = _scheduler(kv_tokens=48)
    reqs = [Request(f"r{i}", [i + 1] * 6, SamplingParams(max_tokens=30, ignore_eos=True)) for i in range(6)]
    raised = decayed = 0
    before, seen = s.new_token_ratio, s.retractions_total
    for _ in _simulate(s, reqs):
        if s.retractions_total > seen:
            raised += s.new_token_ratio > before
        else:
            assert s.new_token_ratio == pytest.approx(max(MIN_NEW_TOKEN_RATIO, before - NEW_TOKEN_RATIO_DECAY))
            decayed += 1
        before, seen = s.new_token_ratio, s.retractions_total
    assert raised and decayed
    assert all(len(r.output_ids) == 30 for r in reqs)
    s.check_idle_invariants()


@pytest.mark.parametrize("radix", [True, False])
def test_many_requests_under_constant_pressure_are_retracted_a_bounded_number_of_times(radix):
    rng = random.Random(3)
    s = _scheduler(kv_tokens=MAX_LEN + 4, max_running=32)
    s.cache.disabled = not radix
    reqs = []
    for i in range(200):
        n = rng.randrange(2, 24)
        reqs.append(Request(f"r{i}", [rng.randrange(8) for _ in range(n)],
                            SamplingParams(max_tokens=rng.randrange(1, MAX_LEN - n), ignore_eos=True)))
    for _ in _simulate(s, reqs[:50]):
        pass
    for _ in _simulate(s, reqs[50:], max_steps=50000):
        pass
    assert all(r.finished and len(r.output_ids) == r.params.max_tokens for r in reqs)
    assert s.retractions_total > len(reqs) // 4, "the pool never got tight"
    assert max(r.retractions for r in reqs) <= PROTECT_AFTER_RETRACTIONS
    s.check_idle_invariants()


def test_a_protected_request_is_not_retracted_while_others_can_be():
    """A, the longest prompt, would be the first victim; protected (as if retracted
    PROTECT_AFTER_RETRACTIONS times already), it runs to its end while the others make room."""
    s = _scheduler(kv_tokens=56)
    a = Request("a", list(range(24)), SamplingParams(max_tokens=24, ignore_eos=True))
    a.metrics.retractions = PROTECT_AFTER_RETRACTIONS
    others = [Request(f"o{i}", [i] * 4, SamplingParams(max_tokens=24, ignore_eos=True)) for i in range(4)]
    for _ in _simulate(s, [a] + others):
        pass
    assert s.retractions_total > 0, "the pool never got tight"
    assert a.retractions == PROTECT_AFTER_RETRACTIONS and len(a.output_ids) == 24
    assert all(len(r.output_ids) == 24 for r in others)
    s.check_idle_invariants()
