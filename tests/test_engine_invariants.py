"""Engine invariants under thousands of random requests: every request ends, no KV slot
leaks, no radix node stays locked — with a KV pool small enough that eviction and
retraction happen."""
from __future__ import annotations

import random
import threading

import pytest

from localsgl.engine.params import SamplingParams
from localsgl.engine.request import Request
from tiny import run_all, tiny_core


def _run_random(core, num_requests: int, seed: int, abort_rate=0.1):
    rng = random.Random(seed)
    prefixes = [[rng.randrange(63) for _ in range(rng.randrange(1, 40))] for _ in range(6)]
    finished: dict[str, set[int]] = {}
    expected: dict[str, int] = {}
    lock = threading.Lock()
    done = threading.Event()
    total = [0]
    errors: list = []

    def make_cb(rid, abort_after):
        count = [0]

        def cb(d):
            count[0] += 1
            if abort_after is not None and count[0] == abort_after:
                core.abort(rid)
            if d.finish_reason is not None:
                if d.finish_reason not in ("stop", "length", "abort"):
                    errors.append(d.finish_reason)
                    done.set()
                with lock:
                    s = finished.setdefault(rid, set())
                    assert d.index not in s, "choice finished twice"
                    s.add(d.index)
                    total[0] += 1
                    if total[0] == sum(expected.values()) and len(expected) == num_requests:
                        done.set()
        return cb

    submitted = 0
    while submitted < num_requests:
        burst = rng.randrange(1, 40)
        for _ in range(min(burst, num_requests - submitted)):
            prompt = list(rng.choice(prefixes)) if rng.random() < 0.7 else []
            prompt += [rng.randrange(63) for _ in range(rng.randrange(1, 50))]
            prompt = prompt[:100]
            n = rng.choice([1, 1, 1, 2, 3])
            p = SamplingParams(
                max_tokens=rng.randrange(1, 24), temperature=rng.choice([0.0, 0.7, 1.0]), n=n,
                seed=rng.choice([None, rng.randrange(1000)]), ignore_eos=rng.random() < 0.5,
                top_k=rng.choice([-1, 5]), top_p=rng.choice([1.0, 0.9]),
            )
            rid = f"r{submitted}"
            abort_after = rng.randrange(1, 6) if rng.random() < abort_rate else None
            with lock:
                expected[rid] = n
            cb = make_cb(rid, abort_after)
            first = Request(rid, prompt, p, 0, cb)
            reqs = [first] + [Request(rid, prompt, p, i, cb, depends_on=first) for i in range(1, n)]
            core.add(reqs)
            if abort_after == 1 and rng.random() < 0.5:
                core.abort(rid)  # abort while (probably) still waiting
            submitted += 1
        core.wait_idle(timeout=None) if rng.random() < 0.2 else None
    assert done.wait(300) and not errors, f"errors {errors[:3]}; only {total[0]} of {sum(expected.values())} choices finished"
    assert core.wait_idle(60)
    return finished, expected


@pytest.mark.parametrize("radix,overlap,count", [(True, False, 1000), (False, False, 400), (True, True, 600)])
def test_random_requests_end_cleanly(radix, overlap, count):
    core = tiny_core(kv_tokens=192, max_running=16, chunk_size=32, max_model_len=128, disable_radix_cache=not radix,
                     overlap=overlap)
    try:
        finished, expected = _run_random(core, count, seed=1 if radix else 2)
        for rid, n in expected.items():
            assert finished[rid] == set(range(n)), rid
        # checks run on the engine thread's state once it is idle
        core.scheduler.check_idle_invariants()
        if radix:
            assert core.cache.hit_tokens > 0, "shared prefixes never hit the cache"
        assert core.scheduler.retractions_total > 0, "pool too large: retraction never exercised"
        core.cache.reset()
        assert core.kv_pool.num_free == core.kv_pool.num_slots
    finally:
        core.shutdown()


def test_overlap_gives_identical_outputs():
    """Overlap scheduling consumes results one step late without changing them."""
    import random as _r

    from localsgl.engine.params import SamplingParams as SP

    rng = _r.Random(5)
    prompts = [[rng.randrange(63) for _ in range(rng.randrange(1, 60))] for _ in range(24)]
    params = [SP(temperature=rng.choice([0.0, 0.9]), seed=i, max_tokens=rng.randrange(1, 30),
                 ignore_eos=rng.random() < 0.5, stop_token_ids=[7]) for i in range(24)]
    outs = {}
    for overlap in (False, True):
        core = tiny_core(kv_tokens=256, max_running=6, chunk_size=16, max_model_len=128, overlap=overlap)
        got = run_all(core, prompts, params, tag="o")
        core.shutdown()
        outs[overlap] = got
    assert outs[True] == outs[False]


def test_decode_slots_reach_a_mirrored_table():
    """With a host mirror (as on a GPU) the scheduler writes decode slots to the mirror only and
    the runner must write them into the table the attention reads: outputs match the plain core."""
    import random as _r

    from localsgl.engine.params import SamplingParams as SP

    rng = _r.Random(11)
    prompts = [[rng.randrange(63) for _ in range(rng.randrange(1, 50))] for _ in range(12)]
    params = [SP(temperature=0.0, max_tokens=rng.randrange(2, 25), ignore_eos=True) for _ in range(12)]
    outs = []
    for mirrored in (False, True):
        core = tiny_core(kv_tokens=256, max_running=6, chunk_size=16, max_model_len=128)
        if mirrored:
            core.req_pool.host = core.req_pool.table.clone()
        got = run_all(core, prompts, params, tag="m")
        core.shutdown()
        outs.append(got)
    assert outs[0] == outs[1]
