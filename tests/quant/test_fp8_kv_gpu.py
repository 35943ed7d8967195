"""The FP8 KV cache on a GPU (skipped without one): prefill logits through the Triton backend
over an FP8 pool stay close to the bf16 pool's (chunks read earlier chunks from the cache), and
an engine with ``kv_cache_dtype="fp8"`` gives the same greedy tokens with CUDA graphs as without
(fused one-token path in both) and nearly the same through the layer path and the torch backend."""
from __future__ import annotations

import functools

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
if torch.cuda.get_device_capability() < (8, 9):
    pytest.skip("the Triton FP8 KV kernels need compute capability 8.9+", allow_module_level=True)

import model_utils  # noqa: E402
from model_utils import save_tiny_llama  # noqa: E402

from localsgl import Engine, SamplingParams  # noqa: E402
from localsgl.engine.debug_switches import DebugSwitches  # noqa: E402
from localsgl.engine.kv_pool import FP8_KV_DTYPE, KVPool  # noqa: E402
from localsgl.engine.models.loader import load_model  # noqa: E402
from localsgl.store.resolve import resolve_model  # noqa: E402


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("llama_fp8kv"), max_position_embeddings=2048)


def test_prefill_logits_close_to_bf16_cache(llama_dir, monkeypatch):
    model = load_model(resolve_model(llama_dir), torch.bfloat16, torch.device("cuda"))
    ids = torch.randint(0, 512, (700,), generator=torch.Generator().manual_seed(1)).tolist()
    ref = model_utils.prefill_logits(model, ids, backend="triton", chunks=[300, 1, 399]).double()
    monkeypatch.setattr(model_utils, "KVPool", functools.partial(KVPool, kv_dtype=FP8_KV_DTYPE))
    got = model_utils.prefill_logits(model, ids, backend="triton", chunks=[300, 1, 399]).double()
    assert torch.isfinite(got).all()
    assert float((got - ref).norm() / ref.norm()) < 0.05


def _greedy(llama_dir, **kw):
    prompts = [torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 300, 900)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    with Engine(model=llama_dir, device="cuda", dtype="bfloat16", kv_cache_dtype="fp8", kv_memory="256MiB",
                max_model_len=1024, **kw) as eng:
        assert eng.core.kv_pool.quantized
        return [eng.generate(p, params).token_ids for p in prompts]  # one at a time: batch-1 decodes


def test_engine_paths_agree_with_fp8_cache(llama_dir):
    graphs = _greedy(llama_dir)
    eager = _greedy(llama_dir, disable_cuda_graph=True)
    layer_path = _greedy(llama_dir, debug_switches=DebugSwitches(fused_decode=False))
    torch_backend = _greedy(llama_dir, attention_backend="torch", disable_cuda_graph=True)
    assert all(len(t) == 24 for t in graphs)
    assert graphs == eager
    for other in (layer_path, torch_backend):  # K/V computed or dequantized in another order: a near tie may flip
        assert sum(g[:8] == t[:8] for g, t in zip(graphs, other)) >= 2
