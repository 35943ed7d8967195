"""Memory-plan math on synthetic devices: an 80 GB H100, GPU caps of 8/12/24/40 GiB, CPUs."""
import json

import pytest
import torch

from localsgl.engine.models.config import ModelConfig
from localsgl.engine.plan import (
    CPU_KV_TOKENS,
    GiB,
    MiB,
    DeviceInfo,
    PlanError,
    cpu_flags,
    cpu_has_bf16,
    default_dtype,
    detect_device,
    graph_buckets,
    layer_gemm_params,
    make_plan,
    piecewise_graphs_by_default,
    piecewise_reserve_bytes,
)

try:
    from localsgl.store.dummy_configs import dummy_config
except ImportError:  # the store's table not there: the published shapes, inline
    dummy_config = None

_FALLBACK = {
    "llama-3.1-8b": dict(
        architectures=["LlamaForCausalLM"], hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
        max_position_embeddings=131072, tie_word_embeddings=False,
    ),
    "llama-3.2-1b": dict(
        architectures=["LlamaForCausalLM"], hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
        max_position_embeddings=131072, tie_word_embeddings=True,
    ),
}


def cfg(name: str) -> ModelConfig:
    raw = dummy_config(name) if dummy_config else None
    return ModelConfig.from_hf(raw or _FALLBACK[name])


L8, L1 = cfg("llama-3.1-8b"), cfg("llama-3.2-1b")

H100 = DeviceInfo(kind="cuda", name="NVIDIA H100 80GB HBM3", total_memory=80 * 10**9, free_memory=79 * 10**9,
                  sm_count=132, capability=(9, 0), bf16=True)
T4 = DeviceInfo(kind="cuda", name="Tesla T4", total_memory=15 * GiB, free_memory=15 * GiB, sm_count=40,
                capability=(7, 5), bf16=False)


def cpu(ram=64 * GiB, bf16=False, cores=16):
    return DeviceInfo(kind="cpu", name="Test CPU", total_memory=ram, free_memory=ram, cores=cores, bf16=bf16)


def accounted(p) -> int:
    return (p.weights_bytes + p.kv_bytes + p.activation_reserve_bytes + p.graph_reserve_bytes
            + p.safety_margin_bytes + p.req_to_token_bytes)


def check_invariants(p, device):
    assert p.kv_tokens == p.kv_bytes // p.kv_bytes_per_token
    assert 1 <= p.max_running
    assert 1 <= p.max_model_len <= p.kv_tokens
    assert 1 <= p.chunk_size <= p.kv_tokens
    if device.kind == "cuda":
        assert accounted(p) <= p.budget_bytes
        assert p.safety_margin_bytes >= max(512 * MiB, int(0.05 * p.budget_bytes)) - 1
        bs = p.cuda_graph_bs
        assert bs and bs[0] == 1 and bs[-1] == p.max_running and len(bs) <= 40
        assert bs == sorted(set(bs))
    else:
        assert p.cuda_graph_bs == []
    assert "\n" not in p.describe()
    json.dumps(p.to_dict())


def test_llama8b_on_h100():
    p = make_plan(L8, H100, "bfloat16")
    check_invariants(p, H100)
    assert p.weights_bytes == L8.num_params * 2
    assert 15.9e9 < p.weights_bytes < 16.2e9
    assert p.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2  # 128 KiB
    # ~79 GB free - 16 GB weights - reserves: roughly 55-60 GB of KV
    assert 50e9 < p.kv_bytes < 62e9
    assert p.kv_tokens > 380_000
    assert p.max_running == 512
    assert p.max_model_len == 131072
    assert p.chunk_size == 2048
    assert p.cuda_graph_bs[:8] == [1, 2, 4, 8, 16, 24, 32, 40]
    assert p.budget_bytes == 79 * 10**9  # free memory at start bounds the budget


@pytest.mark.parametrize("cap_gib", [8, 12])
def test_llama8b_does_not_fit_small_caps(cap_gib):
    with pytest.raises(PlanError, match=r"weights need .*GiB.*bfloat16"):
        make_plan(L8, H100, "bfloat16", gpu_memory=cap_gib * GiB)


def test_llama8b_caps_24_40():
    p24 = make_plan(L8, H100, "bfloat16", gpu_memory=24 * GiB)
    p40 = make_plan(L8, H100, "bfloat16", gpu_memory=40 * GiB)
    for p in (p24, p40):
        check_invariants(p, H100)
    assert p24.budget_bytes == 24 * GiB and p40.budget_bytes == 40 * GiB
    assert accounted(p24) <= 24 * GiB and accounted(p40) <= 40 * GiB
    assert p40.kv_tokens > p24.kv_tokens > 20_000
    assert p24.max_running <= 256  # smaller budgets get the smaller cap
    assert p40.max_running == 512


def test_llama1b_caps_grow_monotonically():
    plans = [make_plan(L1, H100, "bfloat16", gpu_memory=c * GiB) for c in (8, 12, 24, 40)]
    for c, p in zip((8, 12, 24, 40), plans):
        check_invariants(p, H100)
        assert accounted(p) <= c * GiB
        assert p.kv_bytes_per_token == 2 * 16 * 8 * 64 * 2  # 32 KiB
        assert p.weights_bytes == L1.num_params * 2  # tied embeddings counted once
    kv = [p.kv_tokens for p in plans]
    assert kv == sorted(kv) and len(set(kv)) == 4
    assert plans[0].kv_tokens > 50_000  # ~3 GiB of KV on an 8 GiB card


def test_explicit_kv_memory_and_too_much():
    p = make_plan(L1, H100, "bfloat16", kv_memory="2GiB")
    assert p.kv_tokens == 2 * GiB // p.kv_bytes_per_token
    assert p.kv_bytes <= 2 * GiB
    with pytest.raises(PlanError, match="--kv-memory"):
        make_plan(L1, H100, "bfloat16", gpu_memory=8 * GiB, kv_memory=7 * GiB)


def test_explicit_limits_are_respected():
    p = make_plan(L1, H100, torch.bfloat16, max_running=24, max_model_len=8192, chunk_size=1024)
    check_invariants(p, H100)
    assert (p.max_running, p.max_model_len, p.chunk_size) == (24, 8192, 1024)
    assert p.cuda_graph_bs == [1, 2, 4, 8, 16, 24]
    with pytest.raises(PlanError, match="max-model-len"):
        make_plan(L1, cpu(), "float32", kv_memory=64 * MiB, max_model_len=100_000)
    with pytest.raises(PlanError, match="max_running"):
        make_plan(L1, H100, "bfloat16", max_running=0)


def test_max_model_len_over_positions_is_noted():
    p = make_plan(L1, H100, "bfloat16", max_model_len=200_000)
    assert p.max_model_len == 200_000
    assert any("max_position_embeddings" in n for n in p.notes)


def test_disable_cuda_graph_frees_the_reserve():
    with_g = make_plan(L1, H100, "bfloat16", gpu_memory=12 * GiB)
    no_g = make_plan(L1, H100, "bfloat16", gpu_memory=12 * GiB, cuda_graph=False)
    assert no_g.cuda_graph_bs == [] and no_g.graph_reserve_bytes == 0
    assert no_g.kv_tokens > with_g.kv_tokens


def test_piecewise_graphs_by_layer_size_and_their_reserve():
    """On by default for the 1B's layers (61M matmul parameters), off for the 8B's (218M), and
    the graph reserve counts their buffers where they are on."""
    assert layer_gemm_params(L1) == 2048 * (2048 + 2 * 512) + 2048 * 2048 + 3 * 2048 * 8192
    assert piecewise_graphs_by_default(L1) and not piecewise_graphs_by_default(L8)
    p1 = make_plan(L1, H100, "bfloat16", gpu_memory=12 * GiB, max_running=64)
    tokens = p1.chunk_size + 64
    assert piecewise_reserve_bytes(L1, tokens, 2) == tokens * (5 * 2048 + 3 * 8192) * 2
    # the piecewise buffers grow with the step's tokens (chunk + running): the 1B's reserve grows
    # by exactly their difference, the 8B's (no piecewise graphs) does not move
    small = make_plan(L1, H100, "bfloat16", gpu_memory=12 * GiB, max_running=64, chunk_size=512)
    assert p1.graph_reserve_bytes - small.graph_reserve_bytes == \
        piecewise_reserve_bytes(L1, tokens, 2) - piecewise_reserve_bytes(L1, 512 + 64, 2)
    p8 = [make_plan(L8, H100, "bfloat16", max_running=64, chunk_size=c).graph_reserve_bytes for c in (512, 2048)]
    assert p8[0] == p8[1]


def test_free_memory_after_weights_bounds_kv():
    before = make_plan(L8, H100, "bfloat16")
    after = make_plan(L8, H100, "bfloat16", free_memory_after_weights=30 * 10**9)
    assert after.kv_bytes < 30e9 < before.kv_bytes
    check_invariants(after, H100)


def test_tensor_parallel_splits_weights_and_kv():
    p1 = make_plan(L8, H100, "bfloat16", gpu_memory=24 * GiB)
    p2 = make_plan(L8, H100, "bfloat16", gpu_memory=24 * GiB, tp=2)
    assert p2.weights_bytes == pytest.approx(p1.weights_bytes / 2, rel=1e-6)
    assert p2.kv_bytes_per_token == p1.kv_bytes_per_token // 2
    assert p2.kv_tokens > 2 * p1.kv_tokens
    assert "tp=2" in p2.describe()


def test_cpu_plan_defaults():
    dev = cpu(ram=64 * GiB)
    p = make_plan(L1, dev, "float32")
    check_invariants(p, dev)
    assert p.kv_bytes_per_token == 2 * 16 * 8 * 64 * 4
    assert p.kv_tokens == CPU_KV_TOKENS  # sized for the work, not by the 64 GiB of RAM
    assert (p.max_running, p.chunk_size) == (64, 512)
    assert p.max_model_len == min(131072, p.kv_tokens)
    longer = make_plan(L1, dev, "float32", max_model_len=40_000)
    assert longer.kv_tokens == 40_000 and longer.max_model_len == 40_000  # one full request fits
    with pytest.raises(PlanError, match="--max-model-len"):
        make_plan(L1, dev, "float32", max_model_len=100_000)  # 6.1 GiB: over the 4 GiB cap
    if dummy_config is not None:
        smol = ModelConfig.from_hf(dummy_config("smollm2-135m"))
        small = make_plan(smol, cpu(ram=2 * GiB), "float32")
        assert small.kv_tokens == (512 * MiB) // small.kv_bytes_per_token < CPU_KV_TOKENS  # 25% of 2 GiB
    need = make_plan(L1, dev, "float32", max_running=2, max_model_len=1024)
    assert need.kv_tokens == 2048  # capped at what 2 x 1024 tokens need
    assert any("gpu-memory" in n for n in make_plan(L1, dev, "float32", gpu_memory=GiB).notes)


def test_cpu_weights_must_fit_ram():
    with pytest.raises(PlanError, match="RAM; use --dtype bfloat16 or a smaller model$"):
        make_plan(L8, cpu(ram=24 * GiB), "float32")
    make_plan(L8, cpu(ram=64 * GiB), "bfloat16")
    # the advice names only what would shrink the plan: no --dtype bfloat16 where it is bf16 already
    with pytest.raises(PlanError, match="RAM; use a smaller --kv-memory or a smaller model$"):
        make_plan(L8, cpu(ram=24 * GiB), "bfloat16", kv_memory=10 * 1024 * GiB)
    with pytest.raises(PlanError, match="RAM; use a smaller model$"):
        make_plan(L8, cpu(ram=16 * GiB), "bfloat16")
    with pytest.raises(PlanError, match=r"activations \(.*TiB\) do not fit .* RAM; use a smaller --chunk-size or "
                                         r"--max-running or a smaller model$"):
        make_plan(L1, cpu(ram=24 * GiB), "bfloat16", chunk_size=10**11)


def test_default_dtype(monkeypatch):
    from localsgl.engine.layers import cpu_routes

    monkeypatch.setattr(cpu_routes, "native_matmul", lambda dtype: True)  # tests/test_cpu_routes.py: the other cases
    assert default_dtype(H100) == torch.bfloat16
    assert default_dtype(T4) == torch.float16
    assert default_dtype(cpu(bf16=True)) == torch.bfloat16
    assert default_dtype(cpu(bf16=False)) == torch.float32


def test_cpu_flags_parsing():
    info = "processor\t: 0\nmodel name\t: Some Xeon\nflags\t\t: fpu sse avx512f avx512_bf16 amx_tile\n"
    flags = cpu_flags(info)
    assert "avx512_bf16" in flags and cpu_has_bf16(flags)
    assert cpu_has_bf16({"amx_bf16"})
    assert not cpu_has_bf16(cpu_flags("flags\t: fpu sse avx2 avx512f\n"))
    assert cpu_flags("") == set()


def test_graph_buckets():
    assert graph_buckets(1) == [1]
    assert graph_buckets(3) == [1, 2, 3]
    assert graph_buckets(37) == [1, 2, 4, 8, 16, 24, 32, 37]
    b = graph_buckets(512)
    assert b[-1] == 512 and len(b) <= 40 and 256 in b and 160 in b
    big = graph_buckets(4096)
    assert len(big) <= 40 and big[-1] == 4096 and big == sorted(set(big))


def test_t4_weights_and_fp16():
    p = make_plan(L1, T4, default_dtype(T4))
    assert p.dtype == "float16"
    check_invariants(p, T4)
    assert p.max_running <= 256


def test_detect_cpu_device():
    d = detect_device("cpu")
    assert d.kind == "cpu" and d.cores >= 1 and d.total_memory > 0 and d.torch_device == "cpu"
    assert d.name


@pytest.mark.skipif(torch.cuda.is_available(), reason="has CUDA")
def test_detect_cuda_without_gpu_is_clear():
    with pytest.raises(PlanError, match="no CUDA GPU"):
        detect_device("cuda")
    assert detect_device(None).kind == "cpu"
