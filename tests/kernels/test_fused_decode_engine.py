"""The fused one-token forward (layers/fused_decode.py) in the engine, with the Triton
backend under the interpreter: batch-1 decodes go through it and produce the same greedy
tokens as the layer-by-layer path and as the torch backend, for a Llama-shaped and a
qkv-bias (Qwen2-shaped) tiny model; a q/k-norm model falls back to the layer path."""
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


def _model(bias=False, qk_norm=False):
    from tiny import tiny_model

    m = tiny_model(vocab=96, hidden=32, layers=2, heads=4, kv_heads=2, seed=5)
    if bias or qk_norm:
        from localsgl.engine.models.llama import LlamaForCausalLM

        cfg = m.config
        cfg.attention_bias = bias
        cfg.qk_norm = qk_norm
        torch.manual_seed(7)
        m = LlamaForCausalLM(cfg, torch.float32, "cpu")
        for name, p in m.named_parameters():
            p.data.copy_(torch.randn(p.shape) * (0.1 if "norm" in name else 0.3))
            if "norm" in name:
                p.data.add_(1.0)
    return m


def _generate(model, backend, fused, prompts, monkeypatch, max_tokens=6, inspect=None, debug=None, **core_cfg):
    """Greedy tokens of each prompt, run one at a time through a tiny core (batch-1 decode
    steps); with the number of fused one-token calls, and ``inspect(core)``'s result when given.
    ``debug``: the core's other debug switches (``fused`` sets fused_decode)."""
    monkeypatch.setattr(fd, "_FORCE_ON_CPU", True)
    calls = []
    real = fd.forward_one_token
    monkeypatch.setattr(fd, "forward_one_token", lambda *a: calls.append(1) or real(*a))
    import localsgl.engine.models.llama as llama

    monkeypatch.setattr(llama, "forward_one_token", fd.forward_one_token)
    core = EngineCore(model, None, [95], torch.device("cpu"),
                      CoreConfig(**{"kv_tokens": 1024, "max_running": 4, "chunk_size": 64, "max_model_len": 256,
                                    "attention_backend": "torch", **core_cfg},
                                 debug=(debug or DebugSwitches()).with_(fused_decode=fused)),
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

            core.add_many([[Request(f"r{i}", ids, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), 0, cb)]])
            assert done.wait(600)
            outs.append(got)
        inspected = inspect(core) if inspect is not None else None
    finally:
        core.shutdown()
    return (outs, len(calls)) if inspect is None else (outs, len(calls), inspected)


@pytest.mark.parametrize("bias", [False, True])
def test_fused_one_token_greedy(bias, monkeypatch):
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, 95, (n,), generator=g).tolist() for n in (1, 9, 30)]
    model = _model(bias=bias)
    ref, _ = _generate(model, "torch", False, prompts, monkeypatch)
    fused, n_fused = _generate(model, "triton", True, prompts, monkeypatch)
    plain, n_plain = _generate(model, "triton", False, prompts, monkeypatch)
    assert fused == ref == plain
    assert n_fused >= 3 * 5 and n_plain == 0  # the 5 decode steps of every request went through it
    if bias:
        assert model.layers[0].self_attn.qkv_proj.bias is not None


def test_qk_norm_model_falls_back(monkeypatch):
    model = _model(qk_norm=True)
    assert not fd.fused_decode_shapes_ok(model)
    outs, n = _generate(model, "triton", True, [[1, 2, 3]], monkeypatch)
    assert n == 0 and len(outs[0]) == 6
