"""Decode CUDA graphs captured in stages: the order of the buckets, which graph a batch
replays while some are missing (or none: eager), and when the engine thread captures the
rest — with a fake graph runner on the CPU (tests/gpu checks the real one's tokens)."""
from __future__ import annotations

import random
import threading

import torch

from localsgl.engine.core import CoreConfig, EngineCore
from localsgl.engine.graph_schedule import GraphKey, GraphSchedule, capture_order
from localsgl.engine.params import SamplingParams
from localsgl.engine.request import Request
from tiny import tiny_model

K = GraphKey


def test_capture_order_small_plain_buckets_first_then_the_rest_largest_first():
    first, later = capture_order([1, 2, 4, 8, 16, 24, 32], cascade=True, startup_max_bs=8)
    assert first == [K(8, False), K(4, False), K(2, False), K(1, False)]
    assert later == [K(32, False), K(32, True), K(24, False), K(24, True), K(16, False), K(16, True),
                     K(8, True), K(4, True), K(2, True)]
    first, later = capture_order([1, 2, 4, 8, 16], cascade=False, startup_max_bs=8)
    assert first == [K(8, False), K(4, False), K(2, False), K(1, False)] and later == [K(16, False)]


def test_capture_order_always_starts_with_the_smallest_bucket():
    first, later = capture_order([16, 48], cascade=True, startup_max_bs=8)
    assert first == [K(16, False)]
    assert later == [K(48, False), K(48, True), K(16, True)]
    assert capture_order([], cascade=True) == ([], [])
    assert capture_order([1, 2, 4], cascade=True)[0] == [K(1, False)]  # by default batch 1 alone serves first
    first, later = capture_order([1, 2, 4], cascade=False, startup_max_bs=1)
    assert first == [K(1, False)] and later == [K(4, False), K(2, False)]


def test_capture_order_with_no_startup_buckets_defers_every_graph():
    first, later = capture_order([1, 2, 4], cascade=True, startup_max_bs=0)
    assert first == []
    assert later == [K(4, False), K(4, True), K(2, False), K(2, True), K(1, False)]
    s = GraphSchedule([1, 2, 4], cascade=False, startup_max_bs=0)
    assert s.startup_done and s.bucket_for(1) is None and s.wants_capture(1)


def test_schedule_replays_the_smallest_captured_bucket_or_none():
    s = GraphSchedule([1, 2, 4, 8, 16, 24], cascade=True, startup_max_bs=8)
    assert s.bucket_for(1) is None and not s.startup_done
    for key in s.startup:
        s.mark_captured(key)
    assert s.startup_done and not s.done
    assert [s.bucket_for(b) for b in (1, 2, 3, 5, 8, 9, 24)] == [1, 2, 4, 8, 8, None, None]
    assert s.key_for(9, cascade=False) is None  # eager
    assert s.key_for(3, cascade=True) == K(4, False)  # no cascade variant yet: the plain graph
    assert s.wants_capture(12) and not s.wants_capture(3)
    assert s.next_key() == K(24, False)
    s.mark_captured(K(24, False))
    assert s.key_for(12, cascade=False) == K(24, False)  # padded into the larger bucket meanwhile
    assert s.wants_capture(12) and not s.wants_capture(20)
    assert s.next_key() == K(24, True) and s.next_key(plain_only=True) == K(16, False)
    s.mark_captured(K(16, False))
    s.mark_captured(K(4, True))
    assert s.key_for(12, cascade=True) == K(16, False) and s.key_for(3, cascade=True) == K(4, True)
    assert not s.wants_capture(12) and not s.wants_capture(100)  # beyond every bucket: always eager
    s.abandon()
    assert s.done and not s.wants_capture(2) and s.next_key() is None


class FakeGraphs:
    """CudaGraphRunner's interface over the real GraphSchedule; 'replays' run the runner's
    eager path and are recorded, captures are recorded (and wait for ``allow``)."""

    def __init__(self, runner, batch_sizes, cascade=False):
        self.runner = runner
        self.schedule = GraphSchedule(batch_sizes, cascade, startup_max_bs=8)
        for key in self.schedule.startup:
            self.schedule.mark_captured(key)
        self.done = threading.Event()
        self.allow = threading.Event()
        self.allow.set()
        self.captures: list[tuple[GraphKey, bool]] = []  # (key, while requests were running)
        self.replays: list[tuple[int, int]] = []  # (batch size, bucket)
        self.eager_decodes: list[int] = []
        self.busy = threading.Event()
        self.piecewise = None  # no extend graphs: extend steps run eagerly

    @property
    def pending(self):
        return not self.schedule.done

    def can_run(self, bs):
        ok = self.schedule.bucket_for(bs) is not None
        if not ok:
            self.eager_decodes.append(bs)
        return ok

    def replay(self, sb, prev_tokens, groups=None):
        key = self.schedule.key_for(len(sb.reqs), groups is not None)
        self.replays.append((len(sb.reqs), key.batch_size))
        return self.runner._forward_eager(sb, prev_tokens)

    def capture_next(self, plain_only=False):
        if not self.allow.wait(0.01):
            return
        key = self.schedule.next_key(plain_only)
        if key is None:
            return
        self.captures.append((key, self.busy.is_set()))
        self.schedule.mark_captured(key)
        if self.schedule.done:
            self.done.set()


def _core(batch_sizes, max_running=16):
    m = tiny_model()
    core = EngineCore(m, None, [m.config.vocab_size - 1], torch.device("cpu"),
                      CoreConfig(kv_tokens=1024, max_running=max_running, chunk_size=512, max_model_len=128,
                                 attention_backend="torch"), start_thread=False)
    core.runner.graphs = FakeGraphs(core.runner, batch_sizes)
    return core


def _submit(core, prompts, max_tokens, busy=None):
    got, done = {}, threading.Event()

    def cb_for(i):
        toks = []

        def cb(d):
            toks.extend(d.token_ids)
            if d.finish_reason is not None:
                got[i] = toks
                if len(got) == len(prompts):
                    if busy is not None:
                        busy.clear()
                    done.set()
        return cb

    if busy is not None:
        busy.set()
    p = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    core.add_many([[Request(f"g{i}", pr, p, 0, cb_for(i))] for i, pr in enumerate(prompts)])
    return got, done


def _start(core):
    core.attach_thread(threading.Thread(target=core.run_loop, daemon=True))
    core._thread.start()


def _prompts(n, seed=3):
    rng = random.Random(seed)
    return [[rng.randrange(63) for _ in range(rng.randrange(2, 20))] for _ in range(n)]


def test_batches_beyond_the_captured_buckets_run_eagerly_with_the_same_tokens():
    prompts = _prompts(12)
    reference = _core([1, 2, 4, 8, 16])
    reference.runner.graphs = None  # plain eager engine
    _start(reference)
    want, done = _submit(reference, prompts, 12)
    assert done.wait(60)
    reference.shutdown()

    core = _core([1, 2, 4, 8, 16])
    fake = core.runner.graphs
    fake.allow.clear()  # nothing more gets captured: 16 stays missing
    got, done = _submit(core, prompts, 12)
    _start(core)
    assert done.wait(60)
    core.shutdown()
    assert got == want
    assert fake.eager_decodes and set(fake.eager_decodes) == {12}  # all 12 decode together, eagerly
    assert fake.replays == [] and fake.captures == []
    core.scheduler.check_idle_invariants()


def test_a_waiting_batch_gets_its_plain_bucket_next_and_the_rest_follow_when_idle():
    core = _core([1, 2, 4, 8, 16, 24])
    core.runner.prefix_shape = None
    fake = core.runner.graphs
    fake.schedule = GraphSchedule([1, 2, 4, 8, 16, 24], cascade=True, startup_max_bs=8)
    for key in fake.schedule.startup:
        fake.schedule.mark_captured(key)
    got, done = _submit(core, _prompts(12, seed=4), 10, busy=fake.busy)
    _start(core)  # requests already queued: the engine is busy from its first step
    assert done.wait(60)
    assert fake.done.wait(30)  # idle: the cascade variants follow
    core.shutdown()
    busy = [k for k, b in fake.captures if b]
    assert busy == [K(24, False), K(16, False)]  # only what the waiting batch needed, largest first
    assert [k for k, b in fake.captures if not b] == [K(24, True), K(16, True), K(8, True), K(4, True), K(2, True)]
    # one eager step, one replay padded into 24, then its own bucket to the end
    assert fake.eager_decodes == [12]
    assert fake.replays[0] == (12, 24) and fake.replays[1:] == [(12, 16)] * (len(fake.replays) - 1)
    assert len(got) == 12 and all(len(t) == 10 for t in got.values())


def test_idle_engine_captures_everything_in_order_and_blocks_again():
    core = _core([1, 2, 4, 8, 16, 24, 32])
    fake = core.runner.graphs
    _start(core)
    assert fake.done.wait(30)
    assert [k for k, _ in fake.captures] == [K(32, False), K(24, False), K(16, False)]
    assert not core.runner.graphs_pending
    got, done = _submit(core, _prompts(3), 4)
    assert done.wait(30)
    core.shutdown()
    assert all(b == 4 for bs, b in fake.replays if bs == 3)
