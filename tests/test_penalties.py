"""Penalties from device-side state (PenaltyState) equal the exact recomputation from the token
lists: over random histories with placeholders and shortened outputs, and in the engine with
overlap, retraction and n > 1 choices — without making overlapped steps wait."""
from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

import localsgl.engine.sampling as sampling
from localsgl.engine.params import SamplingParams as SP
from localsgl.engine.penalties import PenaltyState
from localsgl.engine.request import Request
from localsgl.engine.sampling import SamplingBatch, sample
from tiny import run_all, tiny_core

CPU = torch.device("cpu")


def exact_tensors(reqs, V, prev=None):
    """Reference: counts and prompt mask recomputed from each request's lists (placeholders
    -(1+j) read from prev[j])."""
    counts = torch.zeros(len(reqs), V)
    mask = torch.zeros(len(reqs), V, dtype=torch.bool)
    for i, r in enumerate(reqs):
        out = [t if t >= 0 else int(prev[-t - 1]) for t in r.output_ids]
        for t, c in Counter(out).items():
            counts[i, t] = c
        if r.params.repetition_penalty != 1.0:
            mask[i, list(set(r.prompt_ids))] = True
    return counts, mask


class ExactPenalties:
    """Drop-in for the engine's PenaltyState that recomputes everything from the lists."""

    def __init__(self, V):
        self.V = V
        self.num_rows = 0

    def gather(self, reqs, prev=None):
        counts, mask = exact_tensors(reqs, self.V, prev)
        return counts, (mask if any(r.params.repetition_penalty != 1.0 for r in reqs) else None)

    def free(self, req):
        pass


def _random_params(rng):
    return SP(temperature=0, repetition_penalty=rng.choice([1.0, 0.8, 1.3]),
              frequency_penalty=rng.choice([0.0, 0.5, -0.7]), presence_penalty=rng.choice([0.0, 1.0]))


def test_state_follows_outputs_with_placeholders_shortening_and_reuse():
    rng = random.Random(3)
    V = 50
    state = PenaltyState(V, CPU)
    live: list[Request] = []
    opened = 0
    prev = torch.empty(0, dtype=torch.int64)
    for step in range(300):
        if len(live) < 12 and rng.random() < 0.4:  # admit
            p = _random_params(rng)
            if p.repetition_penalty == p.frequency_penalty + 1.0 == p.presence_penalty + 1.0:
                p = SP(temperature=0, repetition_penalty=1.5)
            live.append(Request(f"r{opened}", [rng.randrange(V) for _ in range(rng.randrange(0, 30))], p))
            opened += 1
        if live and rng.random() < 0.1:  # finish
            state.free(live.pop(rng.randrange(len(live))))
        for r in live:  # the last step resolves: its placeholders become the ids it sampled
            r.output_ids = [t if t >= 0 else int(prev[-t - 1]) for t in r.output_ids]
        prev = torch.randint(0, V, (len(live) + 1,))
        shortened = []
        for j, r in enumerate(live):
            u = rng.random()
            if u < 0.5:
                r.output_ids.append(-(1 + j))  # the step in flight sampled prev[j] for it
            elif u < 0.6:
                r.output_ids.extend(rng.randrange(V) for _ in range(rng.randrange(1, 5)))
            elif u < 0.65 and r.output_ids:  # tokens dropped (seen before the output grows again)
                del r.output_ids[rng.randrange(len(r.output_ids)):]
                shortened.append(r)
        batch = rng.sample(live, rng.randrange(len(live) + 1)) if live else []
        batch += [r for r in shortened if r not in batch]
        if not batch:
            continue
        counts, mask = state.gather(batch, prev)
        ref_counts, ref_mask = exact_tensors(batch, V, prev)
        assert torch.equal(counts.float(), ref_counts), step
        if any(r.params.repetition_penalty != 1.0 for r in batch):
            assert torch.equal(mask, ref_mask), step
        else:
            assert mask is None
    assert state.num_rows == len(live)
    for r in live:
        state.free(r)
    assert state.num_rows == 0


def test_sampled_tokens_equal_the_list_built_batch():
    """Logits after penalties and the sampled ids, from the device state vs. the lists."""
    rng = random.Random(8)
    g = torch.Generator().manual_seed(2)
    V, B = 80, 10
    state = PenaltyState(V, CPU)
    reqs = []
    for i in range(B):
        p = _random_params(rng) if i % 4 else SP(temperature=0.7, seed=i)
        if i % 3 == 1:
            p = SP(temperature=0.9, seed=i, repetition_penalty=1.4, presence_penalty=0.5)
        reqs.append(Request(f"q{i}", [rng.randrange(V) for _ in range(rng.randrange(1, 20))], p))
    for step in range(20):
        logits = torch.randn(B, V, generator=g) * 3

        def go(source):
            gens = [torch.Generator().manual_seed(r.params.seed + step) if r.params.seed is not None else None
                    for r in reqs]
            b = SamplingBatch.build([r.params for r in reqs], [r.prompt_ids for r in reqs],
                                    [r.output_ids for r in reqs], gens, [V - 1], V, CPU,
                                    torch.Generator().manual_seed(step), penalty_source=source)
            x = sampling._penalise(logits.clone(), b, None) if b.pen_count else logits
            return x, sample(logits, b).token_ids

        x_dev, tok_dev = go(lambda pen: state.gather([reqs[i] for i in pen]))
        x_ref, tok_ref = go(None)
        assert torch.equal(x_dev, x_ref)
        assert tok_dev == tok_ref
        for r, t in zip(reqs, tok_dev):
            r.output_ids.append(t)


def _engine_outputs(penalties_impl, overlap, seed=0):
    rng = random.Random(seed)
    prompts, params = [], []
    for i in range(14):
        prompts.append([rng.randrange(63) for _ in range(rng.randrange(4, 40))])
        params.append(SP(temperature=rng.choice([0.0, 0.8]), seed=i, max_tokens=rng.randrange(8, 28), ignore_eos=True,
                         n=rng.choice([1, 1, 2]),
                         repetition_penalty=rng.choice([1.0, 1.3, 2.0]), frequency_penalty=rng.choice([0.0, 0.8]),
                         presence_penalty=rng.choice([0.0, 0.6])))
    params[0] = SP(temperature=0.0, max_tokens=20, ignore_eos=True)  # an unpenalised row alongside
    core = tiny_core(kv_tokens=112, max_running=8, chunk_size=16, max_model_len=128, overlap=overlap)
    if penalties_impl == "exact":
        core.penalties = ExactPenalties(core.vocab_size)
    launched_in_flight = [0]
    forward = core.runner.forward

    def counting_forward(sb, prev_tokens=None):
        launched_in_flight[0] += prev_tokens is not None  # launched while the last step was unresolved
        return forward(sb, prev_tokens=prev_tokens)

    core.runner.forward = counting_forward
    try:
        got = _run_with_choices(core, prompts, params)
        retractions = core.scheduler.retractions_total
        rows_left = core.penalties.num_rows
    finally:
        core.shutdown()
    return got, retractions, launched_in_flight[0], rows_left


def _run_with_choices(core, prompts, params):
    """Like tiny.run_all, with n > 1 choices as sibling requests."""
    import threading

    got, done = {}, threading.Event()
    total = sum(p.n for p in params)

    def cb_for(key):
        toks = []

        def cb(d):
            toks.extend(d.token_ids)
            if d.finish_reason is not None:
                got[key] = (toks, d.finish_reason)
                if len(got) == total:
                    done.set()
        return cb

    groups = []
    for i, (pr, p) in enumerate(zip(prompts, params)):
        first = Request(f"e{i}", pr, p, 0, cb_for((i, 0)))
        groups.append([first] + [Request(f"e{i}", pr, p, k, cb_for((i, k)), depends_on=first) for k in range(1, p.n)])
    core.add_many(groups)
    assert done.wait(120)
    assert core.wait_idle(30)
    core.scheduler.check_idle_invariants()
    return got


@pytest.mark.parametrize("overlap", [False, True])
def test_engine_penalties_equal_exact_recomputation(overlap):
    """Same schedule, same tokens: device state vs. recomputing from the lists every step, with
    retraction (small pool) and n > 1; with overlap, penalised steps still launch while the
    previous step is in flight, and every row is freed at the end."""
    dev, retr, in_flight, rows_left = _engine_outputs("device", overlap)
    ref, retr_ref, _, _ = _engine_outputs("exact", overlap)
    assert dev == ref
    assert retr == retr_ref and retr > 0, "pool too large: retraction never exercised"
    assert rows_left == 0
    if overlap:
        assert in_flight > 10, "penalised requests forced synchronous steps"
