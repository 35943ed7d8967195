"""An FP8 KV cache in the engine, with the Triton backend under the interpreter: batch-1
decodes through the fused one-token path (its K/V staged, then quantized by the backend's
store), the layer path and the torch backend all store the same e4m3 bits and give the same
greedy tokens; the pool holds e4m3 values with per-(token, head) scales."""
import sys
import threading

import pytest
import torch
from kutil import ON_GPU

import localsgl.engine.layers.fused_decode as fd
from localsgl.engine.core import CoreConfig, EngineCore
from localsgl.engine.debug_switches import DebugSwitches
from localsgl.engine.params import SamplingParams
from localsgl.engine.request import Request

pytestmark = pytest.mark.skipif(ON_GPU, reason="tests/gpu covers the GPU engine")
sys.path.insert(0, "tests")


def _generate(model, backend, fused, prompts, monkeypatch):
    monkeypatch.setattr(fd, "_FORCE_ON_CPU", True)
    calls = []
    real = fd.forward_one_token
    monkeypatch.setattr(fd, "forward_one_token", lambda *a: calls.append(1) or real(*a))
    import localsgl.engine.models.llama as llama

    monkeypatch.setattr(llama, "forward_one_token", fd.forward_one_token)
    core = EngineCore(model, None, [95], torch.device("cpu"),
                      CoreConfig(kv_tokens=512, max_running=4, chunk_size=64, max_model_len=128,
                                 attention_backend="torch", kv_cache_dtype="fp8",
                                 disable_radix_cache=True, debug=DebugSwitches(fused_decode=fused)),
                      overlap=False, start_thread=False)
    if backend == "triton":  # create_backend refuses triton without CUDA; the interpreter runs it
        from localsgl.engine.layers.attention.triton_backend import TritonAttentionBackend

        core.attn = core.runner.attn = TritonAttentionBackend()
    core.attach_thread(threading.Thread(target=core.run_loop, daemon=True))
    core._thread.start()
    outs = []
    try:
        for i, ids in enumerate(prompts):  # one at a time: every decode step has batch 1
            got, done = [], threading.Event()

            def cb(d, got=got, done=done):
                got.extend(d.token_ids)
                if d.finish_reason:
                    done.set()

            core.add_many([[Request(f"r{i}", ids, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), 0, cb)]])
            assert done.wait(600)
            outs.append(got)
        pool = core.kv_pool
        # the first request's slots (radix cache off: slots are handed out from 1 upwards)
        n = len(prompts[0]) + 4
        kv = (pool.k_buffer[0][1 : n + 1].clone(), pool.k_scale[0][:, 1 : n + 1].clone())
    finally:
        core.shutdown()
    return outs, len(calls), pool, kv


def test_fp8_kv_fused_layer_and_torch_paths_agree(monkeypatch):
    from tiny import tiny_model

    model = tiny_model(vocab=96, hidden=32, layers=2, heads=4, kv_heads=2, seed=5)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 95, (n,), generator=g).tolist() for n in (9, 30)]
    ref, _, pool, kv_ref = _generate(model, "torch", False, prompts, monkeypatch)
    assert pool.quantized and pool.k_buffer[0].dtype == torch.float8_e4m3fn and pool.k_scale[0].dtype == torch.float32
    fused, n_fused, _, kv_fused = _generate(model, "triton", True, prompts, monkeypatch)
    plain, n_plain, _, kv_plain = _generate(model, "triton", False, prompts, monkeypatch)
    assert fused == ref == plain
    assert n_fused >= 2 * 4 and n_plain == 0
    for kv in (kv_fused, kv_plain):  # the prompt's and decoded tokens' K, as the torch path stored them
        assert (kv[0].view(torch.uint8) == kv_ref[0].view(torch.uint8)).float().mean() > 0.99
        assert torch.allclose(kv[1], kv_ref[1], rtol=1e-4)
