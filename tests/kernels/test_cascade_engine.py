"""The engine with the Triton backend (interpreter on the CPU): requests sharing a cached
prefix decode through the shared-prefix (cascade) stage and produce the same greedy tokens
as with the stage off and as the torch backend."""
import pytest
import torch
from kutil import ON_GPU

import localsgl.engine.prefix_groups as pg
from localsgl.engine.core import CoreConfig, EngineCore
from localsgl.engine.debug_switches import DebugSwitches
from localsgl.engine.params import SamplingParams
from localsgl.engine.request import Request

pytestmark = pytest.mark.skipif(ON_GPU, reason="tests/gpu covers the GPU engine")


def run(backend, cascade, prompts, monkeypatch):
    import sys

    sys.path.insert(0, "tests")
    from tiny import tiny_model

    m = tiny_model(vocab=96, hidden=32, layers=2, heads=4, kv_heads=2)
    import threading

    core = EngineCore(m, None, [95], torch.device("cpu"),
                      CoreConfig(kv_tokens=2048, max_running=8, chunk_size=256, max_model_len=256,
                                 attention_backend="torch", debug=DebugSwitches(cascade=cascade)),
                      overlap=False, start_thread=False)
    if backend == "triton":  # create_backend refuses triton without CUDA; the interpreter runs it
        from localsgl.engine.layers.attention.triton_backend import TritonAttentionBackend

        core.attn = core.runner.attn = TritonAttentionBackend()
        if cascade:
            core.runner.prefix_shape = core.attn.prefix_group_shape(4, 2)
    core.attach_thread(threading.Thread(target=core.run_loop, daemon=True))
    core._thread.start()
    outs = {}
    done = []

    def cb(i):
        def f(d):
            outs.setdefault(i, []).extend(d.token_ids)
            if d.finish_reason:
                done.append(i)
        return f

    try:
        core.add_many([[Request(f"r{i}", ids, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), 0, cb(i))]
                       for i, ids in enumerate(prompts)])
        assert core.wait_idle(600)
    finally:
        core.shutdown()
    assert len(done) == len(prompts)
    return [outs[i] for i in range(len(prompts))]


def test_cascade_engine_greedy(monkeypatch):
    g = torch.Generator().manual_seed(3)
    shared = torch.randint(0, 95, (80,), generator=g).tolist()
    prompts = [shared + torch.randint(0, 95, (n,), generator=g).tolist() for n in (1, 7, 20, 3)]
    monkeypatch.setattr(pg, "MIN_SAVED_TOKENS", 64)
    fired = []
    real = pg.shared_prefix_groups

    def spy(*a, **k):
        out = real(*a, **k)
        fired.append(out)
        return out

    monkeypatch.setattr(pg, "shared_prefix_groups", spy)
    with_cascade = run("triton", True, prompts, monkeypatch)
    assert any(fired), "no decode step formed a shared-prefix group"
    assert any(plen >= 80 and len(rows) >= 2 for step in fired for plen, rows in step)
    assert with_cascade == run("triton", False, prompts, monkeypatch)
    assert with_cascade == run("torch", False, prompts, monkeypatch)
