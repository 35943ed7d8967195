"""An FP8 KV cache in the engine, with the Triton backend under the interpreter: batch-1
decodes through the fused one-token path (its K/V staged, then quantized by the backend's
store), the layer path and the torch backend all store the same e4m3 bits and give the same
greedy tokens; the pool holds e4m3 values with per-(token, head) scales."""
import sys

import pytest
import torch
from kutil import ON_GPU
from test_fused_decode_engine import _generate as generate_one_at_a_time

pytestmark = pytest.mark.skipif(ON_GPU, reason="tests/gpu covers the GPU engine")
sys.path.insert(0, "tests")


def _generate(model, backend, fused, prompts, monkeypatch):
    def first_request_kv(core):
        pool = core.kv_pool
        # the first request's slots (radix cache off: slots are handed out from 1 upwards)
        n = len(prompts[0]) + 4
        return pool, (pool.k_buffer[0][1 : n + 1].clone(), pool.k_scale[0][:, 1 : n + 1].clone())

    outs, calls, (pool, kv) = generate_one_at_a_time(
        model, backend, fused, prompts, monkeypatch, max_tokens=5, inspect=first_request_kv,
        kv_tokens=512, max_model_len=128, kv_cache_dtype="fp8", disable_radix_cache=True)
    return outs, calls, pool, kv


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
