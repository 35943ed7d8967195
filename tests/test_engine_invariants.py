"""Engine invariants under thousands of random requests: every request ends, no KV slot
leaks, no radix node stays locked — with a KV pool small enough that eviction and
retraction happen, and with exceptions injected at random steps and places."""
from __future__ import annotations

import random
import threading

import pytest
import torch

from localsgl.engine.params import SamplingParams
from localsgl.engine.request import Request
from tiny import run_all, tiny_core


class RandomFaults:
    """EngineCore.fault hook raising at random calls of every point (an out-of-memory error
    for some forwards); remembers every (rid, choice) a raising call worked on."""

    RATES = {"schedule": 0.003, "forward": 0.006, "commit": 0.003, "sample": 0.004, "resolve": 0.003,
             "detokenize": 0.001}

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.hit: set[tuple[str, int]] = set()
        self.raised: dict[str, int] = {}

    def __call__(self, point, reqs):
        if self.rng.random() >= self.RATES[point]:
            return
        self.hit.update((r.rid, r.index) for r in reqs)
        self.raised[point] = self.raised.get(point, 0) + 1
        if point == "forward" and self.rng.random() < 0.3:
            raise torch.OutOfMemoryError(f"injected out-of-memory at {point}")
        raise RuntimeError(f"injected fault at {point}")


def _run_random(core, num_requests: int, seed: int, abort_rate=0.1, faults: RandomFaults | None = None):
    """Random bursts of requests; with faults, also consumers whose callback raises once.  Every
    choice must end; "error" only for choices a fault hit.  Returns ({rid: finished choices},
    {rid: n}, number of choices ended by "error")."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(63) for _ in range(rng.randrange(1, 40))] for _ in range(6)]
    finished: dict[str, set[int]] = {}
    expected: dict[str, int] = {}
    lock = threading.Lock()
    done = threading.Event()
    total = [0]
    errors: list = []
    failed = [0]
    hit = faults.hit if faults is not None else set()

    def make_cb(rid, abort_after, raise_after):
        count = {}

        def cb(d):
            c = count[d.index] = count.get(d.index, 0) + 1
            if abort_after is not None and c == abort_after:
                core.abort(rid)
            if raise_after is not None and c == raise_after and d.finish_reason is None:
                hit.add((rid, d.index))
                raise RuntimeError("injected consumer failure")
            if d.finish_reason is not None:
                if d.finish_reason == "error" and (rid, d.index) in hit and d.extra.get("error"):
                    failed[0] += 1
                elif d.finish_reason not in ("stop", "length", "abort"):
                    errors.append((rid, d.index, d.finish_reason, d.extra.get("error")))
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
            raise_after = rng.randrange(1, 6) if faults is not None and rng.random() < 0.02 else None
            with lock:
                expected[rid] = n
            cb = make_cb(rid, abort_after, raise_after)
            first = Request(rid, prompt, p, 0, cb)
            reqs = [first] + [Request(rid, prompt, p, i, cb, depends_on=first) for i in range(1, n)]
            core.add(reqs)
            if abort_after == 1 and rng.random() < 0.5:
                core.abort(rid)  # abort while (probably) still waiting
            submitted += 1
        core.wait_idle(timeout=None) if rng.random() < 0.2 else None
    assert done.wait(300) and not errors, f"errors {errors[:3]}; only {total[0]} of {sum(expected.values())} choices finished"
    assert core.wait_idle(60)
    return finished, expected, failed[0]


@pytest.mark.parametrize("radix,overlap,count,faults", [(True, False, 1000, True), (False, False, 400, False),
                                                        (True, True, 600, True)])
def test_random_requests_end_cleanly(radix, overlap, count, faults):
    core = tiny_core(kv_tokens=192, max_running=16, chunk_size=32, max_model_len=128, disable_radix_cache=not radix,
                     overlap=overlap)
    hook = RandomFaults(seed=count) if faults else None
    core.fault = hook
    try:
        finished, expected, failed = _run_random(core, count, seed=1 if radix else 2, faults=hook)
        for rid, n in expected.items():
            assert finished[rid] == set(range(n)), rid
        # checks run on the engine thread's state once it is idle
        core.scheduler.check_idle_invariants()
        if radix:
            assert core.cache.hit_tokens > 0, "shared prefixes never hit the cache"
            for node in core.cache._iter_nodes():
                assert min(node.key, default=0) >= 0, "a placeholder id reached the radix cache"
        assert core.scheduler.retractions_total > 0, "pool too large: retraction never exercised"
        if faults:
            assert set(hook.raised) == set(RandomFaults.RATES), f"some fault points never fired: {hook.raised}"
            assert failed > 0, "no request ended with an error"
            core.fault = None
            got = run_all(core, [[1, 2, 3]], [SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)], tag="z")
            assert got[0][1] == "length" and len(got[0][0]) == 5, "the engine stopped answering"
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
