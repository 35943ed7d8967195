"""The CPU default dtype follows the signals the CPU routes read: bf16 only where torch
multiplies it natively here, else fp32 unless the fp32 weights would crowd the RAM."""
import pytest
import torch

from localsgl.engine.layers import cpu_routes
from localsgl.engine.models.config import ModelConfig
from localsgl.engine.plan import DeviceInfo, default_dtype, weights_bytes_for

GiB = 1 << 30


def _cpu(bf16: bool, ram: int = 16 * GiB) -> DeviceInfo:
    return DeviceInfo(kind="cpu", name="Test CPU", total_memory=ram, free_memory=ram, cores=2, bf16=bf16)


def _config(hidden: int, layers: int) -> ModelConfig:
    return ModelConfig(architecture="LlamaForCausalLM", hidden_size=hidden, intermediate_size=4 * hidden,
                       num_layers=layers, num_heads=hidden // 64, num_kv_heads=hidden // 64, head_dim=64,
                       vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-6)


@pytest.fixture
def native(monkeypatch):
    """Set what the route detection reports for torch's native bf16 matmul."""
    def set_native(value: bool):
        seen = []
        monkeypatch.setattr(cpu_routes, "native_matmul", lambda dtype: seen.append(dtype) or value)
        return seen
    return set_native


def test_native_bf16_is_the_default(native):
    seen = native(True)
    assert default_dtype(_cpu(bf16=True)) == torch.bfloat16
    assert default_dtype(_cpu(bf16=True), _config(576, 30)) == torch.bfloat16
    assert seen and set(seen) == {torch.bfloat16}


def test_emulated_bf16_defaults_to_fp32(native):
    """The CPU lists avx512_bf16/AMX but torch's oneDNN does not use it (e.g. capped by
    ONEDNN_MAX_CPU_ISA): the same signal the routes read turns the default to fp32."""
    native(False)
    small = _config(576, 30)
    assert default_dtype(_cpu(bf16=True)) == torch.float32
    assert default_dtype(_cpu(bf16=True), small) == torch.float32
    assert default_dtype(_cpu(bf16=False), small) == torch.float32


def test_no_cpu_bf16_is_fp32_even_if_torch_says_native(native):
    native(True)
    assert default_dtype(_cpu(bf16=False)) == torch.float32


def test_fp32_that_would_crowd_the_ram_stays_bf16(native):
    native(False)
    big = _config(4096, 32)  # ~6.7B parameters: ~27 GB in fp32
    fp32 = weights_bytes_for(big, "float32")
    assert default_dtype(_cpu(bf16=False, ram=4 * fp32)) == torch.float32  # no config: size unknown
    assert default_dtype(_cpu(bf16=False, ram=4 * fp32), big) == torch.float32
    assert default_dtype(_cpu(bf16=False, ram=2 * fp32 - 1), big) == torch.bfloat16
    assert default_dtype(_cpu(bf16=False, ram=2 * fp32), big) == torch.float32


def test_cuda_ignores_the_cpu_routes(native):
    seen = native(False)
    gpu = DeviceInfo(kind="cuda", name="GPU", total_memory=80 * GiB, bf16=True)
    assert default_dtype(gpu) == torch.bfloat16 and not seen
