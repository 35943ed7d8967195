"""The FP8 KV cache on the CPU: the plan counts its bytes (an 8B int4 model under
--gpu-memory 8GiB plans at least 16k tokens), the setting parses, the torch backend over an
FP8 pool computes attention over the dequantized values (decode and extend), and the embedded
model with an FP8 KV cache still answers "Paris" with greedy tokens and logits close to the
full-precision cache's."""
from __future__ import annotations

import pytest
import torch

from localsgl.config import SETTINGS
from localsgl.engine.batch import ForwardBatch, ForwardMode
from localsgl.engine.kv_pool import FP8_KV_DTYPE, KVPool, ReqToTokenPool, fp8_dequantize_rows
from localsgl.engine.layers.attention.torch_backend import TorchAttentionBackend
from localsgl.engine.models.config import ModelConfig
from localsgl.engine.plan import DeviceInfo, PlanError, kv_bytes_per_token, make_plan
from localsgl.engine.weight_estimate import estimate
from localsgl.store.resolve import resolve_model
from model_utils import needs_embedded_model

GiB = 1 << 30
H200 = DeviceInfo(kind="cuda", name="H200", total_memory=140 * GiB, free_memory=139 * GiB, sm_count=132,
                  capability=(9, 0), bf16=True)


def test_plan_fp8_kv_8b_int4_under_8gib():
    src = resolve_model("llama-3.1-8b", load_format="dummy", record_use=False)
    cfg = ModelConfig.from_hf(src.config)
    est = estimate(src, cfg, "bfloat16", "cuda", "keep", "int4")
    opts = dict(gpu_memory="8GiB", weights_bytes=est.total_bytes, weights_quantized=est.quantized)
    bf16 = make_plan(cfg, H200, "bfloat16", **opts)
    fp8 = make_plan(cfg, H200, "bfloat16", kv_cache_dtype="fp8", **opts)
    assert fp8.kv_bytes_per_token == 2 * 32 * 8 * (128 + 4) == kv_bytes_per_token(cfg, "bfloat16", 1, "fp8")
    assert fp8.kv_cache_dtype == "fp8" and bf16.kv_cache_dtype is None and "fp8" in fp8.describe()
    assert fp8.kv_tokens >= 16384
    assert 1.9 < fp8.kv_tokens / bf16.kv_tokens < 2.0  # half the bytes, less the scales' 3%
    assert fp8.weights_bytes + fp8.kv_bytes + fp8.activation_reserve_bytes < 8 * GiB
    with pytest.raises(PlanError, match="KV cache dtype"):
        make_plan(cfg, H200, "bfloat16", kv_cache_dtype="int4", **opts)


def test_kv_cache_dtype_setting():
    conv = SETTINGS["kv_cache_dtype"].convert
    assert conv("FP8") == conv("fp8_e4m3") == "fp8" and conv("auto") is None
    with pytest.raises(ValueError):
        conv("int8")
    assert SETTINGS["kv_cache_dtype"].env == "LOCALSGL_KV_CACHE_DTYPE"


def _batch(mode, pool, rt, rows, seqs, exts, attn):
    T = sum(exts)
    locs, starts = [], [0]
    for r, s, e in zip(rows, seqs, exts):
        locs.append(rt.slots(r, s - e, s))
        starts.append(starts[-1] + e)
    return ForwardBatch(
        mode=mode, batch_size=len(rows), input_ids=torch.zeros(T, dtype=torch.long),
        positions=torch.cat([torch.arange(s - e, s) for s, e in zip(seqs, exts)]),
        out_cache_loc=torch.cat(locs), req_pool_indices=torch.tensor(rows),
        seq_lens=torch.tensor(seqs, dtype=torch.int32), prefix_lens=torch.tensor([s - e for s, e in zip(seqs, exts)],
                                                                                  dtype=torch.int32),
        extend_lens=torch.tensor(exts, dtype=torch.int32), extend_start_loc=torch.tensor(starts[:-1], dtype=torch.int32),
        seq_lens_cpu=list(seqs), prefix_lens_cpu=[s - e for s, e in zip(seqs, exts)], extend_lens_cpu=list(exts),
        req_to_token=rt.table, kv_pool=pool, attn_backend=attn,
    )


@pytest.mark.parametrize("mode", [ForwardMode.EXTEND, ForwardMode.DECODE])
def test_torch_backend_over_fp8_pool(mode):
    """Attention over an FP8 pool == attention over a dense pool holding its dequantized values,
    and close to attention over the unquantized K/V."""
    g = torch.Generator().manual_seed(5 + int(mode == ForwardMode.DECODE))
    hq, hkv, d, L = 6, 2, 32, 2
    fp8 = KVPool(200, L, hkv, d, torch.float32, "cpu", kv_dtype=FP8_KV_DTYPE)
    exact = KVPool(200, L, hkv, d, torch.float32, "cpu")
    deq = KVPool(200, L, hkv, d, torch.float32, "cpu")
    rt = ReqToTokenPool(4, 100, "cpu")
    rows, seqs = [rt.alloc() for _ in range(3)], [37, 1, 60]
    for r, n in zip(rows, seqs):
        slots = fp8.alloc(n)
        exact.alloc(n), deq.alloc(n)
        rt.write(r, 0, slots)
    exts = [1, 1, 1] if mode == ForwardMode.DECODE else [5, 1, 60]
    attn = TorchAttentionBackend()
    for layer in range(L):  # fill every slot with random K/V (the prefixes' and the new tokens')
        k = torch.randn(201, hkv, d, generator=g) * (1 + 2 * layer)
        v = torch.randn(201, hkv, d, generator=g)
        loc = torch.arange(201)
        fp8.store(layer, loc, k, v)
        exact.store(layer, loc, k, v)
        deq.k_buffer[layer].copy_(fp8_dequantize_rows(fp8.k_buffer[layer], fp8.k_scale[layer].t(), torch.float32))
        deq.v_buffer[layer].copy_(fp8_dequantize_rows(fp8.v_buffer[layer], fp8.v_scale[layer].t(), torch.float32))
    outs = {}
    for name, pool in (("fp8", fp8), ("exact", exact), ("deq", deq)):
        b = _batch(mode, pool, rt, rows, seqs, exts, attn)
        attn.init_forward(b)
        T = sum(exts)
        q = torch.randn(T, hq, d, generator=torch.Generator().manual_seed(9))
        newk, newv = pool.gather(1, b.out_cache_loc)  # re-store the new tokens' own values
        if name == "exact":
            newk, newv = exact.gather(1, b.out_cache_loc)
        outs[name] = attn.forward(q, newk, newv, 1, b, d**-0.5)
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    assert rel(outs["fp8"], outs["deq"]) < 1e-6
    assert 1e-4 < rel(outs["fp8"], outs["exact"]) < 0.05


@pytest.fixture(scope="module")
def engines():
    from localsgl import Engine

    common = dict(model="smollm2-135m", device="cpu", dtype="float32", kv_memory="64MiB", max_running=4)
    full = Engine(**common)
    fp8 = Engine(**common, kv_cache_dtype="fp8")
    yield full, fp8
    full.shutdown()
    fp8.shutdown()


@needs_embedded_model
def test_embedded_model_with_fp8_kv(engines):
    from localsgl import SamplingParams

    full, fp8 = engines
    assert fp8.plan.kv_cache_dtype == "fp8" and full.plan.kv_cache_dtype is None
    if fp8.in_process:  # the KV pool is in this process only then
        assert fp8.core.kv_pool.quantized and not full.core.kv_pool.quantized
    assert fp8.plan.kv_bytes_per_token < 0.27 * full.plan.kv_bytes_per_token  # fp32 model: 4 bytes -> 1 + scales
    params = SamplingParams(temperature=0, max_tokens=24)
    q = [{"role": "user", "content": "What is the capital of France?"}]
    out_fp8 = fp8.chat(q, params)
    assert "Paris" in out_fp8.text
    out_full = full.chat(q, params)
    # greedy tokens agree for a good stretch (one e4m3 rounding may flip a near tie later)
    same = next((i for i, (a, b) in enumerate(zip(out_fp8.token_ids, out_full.token_ids)) if a != b),
                len(out_full.token_ids))
    assert same >= 8, (out_fp8.text, out_full.text)
