"""kernels/l2_prefetch.py: the spans handed to a prefetching kernel (CPU), and on a GPU the
decode attention's output with o_proj-sized spans prefetched equals the output without them,
bit for bit (a prefetch moves no value), at lengths that prefetch and one that does not."""
import pytest
import torch

from localsgl_kernels import decode_attention as dec
from localsgl_kernels import l2_prefetch as L2


def test_spans_in_bytes_cut_at_the_budget():
    a = torch.zeros(64, 32, dtype=torch.uint8)  # 2,048 bytes
    b = torch.zeros(64, 8, dtype=torch.float16)  # 1,024 bytes
    c = torch.zeros(100, dtype=torch.float32)  # 400 bytes
    s = L2.spans([a, b, None, c], budget=10_000)
    assert [n for _, n in s] == [2048, 1024, 400]
    assert all(p.dtype == torch.uint8 and p.dim() == 1 for p, _ in s)
    assert s[1][0].data_ptr() == b.data_ptr() and s[1][0].numel() == 1024
    assert [n for _, n in L2.spans([a, b, c], budget=2500)] == [2048, 452]  # cut inside b, c dropped
    assert L2.spans([a], budget=0) == []
    with pytest.raises(AssertionError):
        L2.spans([b.t()], budget=10_000)  # a strided view is not one block of memory


def test_kernel_args_pad_the_empty_spans():
    a = torch.zeros(256, dtype=torch.uint8)
    args = L2.kernel_args(L2.spans([a], 1 << 20), dummy=a)
    assert args["PREFETCH"] and args["N0"] == 256 and args["N1"] == args["N2"] == 0
    assert not L2.kernel_args([], dummy=a)["PREFETCH"]


def test_no_prefetch_without_a_gpu_kernel():
    assert not L2.supported(torch.device("cpu"))


def test_the_length_past_which_the_attention_prefetches_nothing(monkeypatch):
    """The attention prefetches only while the K/V it streams for a layer stay within a quarter of
    the L2: 3,200 tokens of Llama-8B's bf16 K/V (8 heads x 128 x 2 x 2 bytes) on a 50 MiB L2,
    twice that with an fp8 KV cache; the GPU test's lengths lie on both sides of it."""
    props = type("Props", (), {"L2_cache_size": 50 << 20})()
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    dev = torch.device("cuda")
    assert L2.span_bytes(dev) == 25 << 20 and L2.max_streamed(dev) == 50 << 18
    assert L2.max_tokens(dev, 8 * 128 * 2 * 2) == 3200 and L2.max_tokens(dev, 8 * 128 * 2) == 6400
    assert 3000 <= L2.max_tokens(dev, 8 * 128 * 2 * 2) < 20000


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("seq_len", [1, 256, 3000, 20000])  # the last past max_streamed: no prefetch
def test_decode_attention_with_prefetch_is_unchanged(seq_len):
    dev = torch.device("cuda")
    assert L2.supported(dev)
    torch.manual_seed(seq_len)
    hq, hkv, d, slots = 32, 8, 128, 32768
    q = torch.randn(1, hq, d, device=dev, dtype=torch.bfloat16)
    k = torch.randn(slots, hkv, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn(slots, hkv, d, device=dev, dtype=torch.bfloat16)
    table = torch.randperm(slots, device=dev)[:seq_len].to(torch.int32).view(1, -1)
    idx = torch.zeros(1, dtype=torch.int64, device=dev)
    lens = torch.tensor([seq_len], dtype=torch.int32, device=dev)
    weight = torch.randint(0, 255, (4096, 2048), dtype=torch.uint8, device=dev)  # int4 o_proj's bytes
    scales = torch.randn(4096, 32, device=dev, dtype=torch.float16)
    spans = L2.spans([weight, scales], L2.span_bytes(dev))
    assert sum(n for _, n in spans) == weight.numel() + scales.numel() * 2
    if seq_len == 20000:  # the case that must take the kernel's no-prefetch branch
        assert seq_len > L2.max_tokens(dev, hkv * d * 2 * k.element_size())
    plain = dec.decode_attention(q, k, v, table, idx, lens, d**-0.5, num_splits=32)
    fetched = dec.decode_attention(q, k, v, table, idx, lens, d**-0.5, num_splits=32, prefetch=spans)
    torch.cuda.synchronize()
    assert torch.equal(plain, fetched)
    ref = dec.decode_attention_ref(q, k, v, table, idx, lens, d**-0.5)
    torch.testing.assert_close(fetched.float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_quantized_gemvs_with_prepared_prefetch_are_unchanged(monkeypatch):
    """int4 batch-1 GEMVs whose activations' preparation also prefetches the weight's head
    (quant_gemv.PREP_PREFETCH_BYTES; checked to have been asked for): the same bits."""
    from localsgl.engine.layers.quant import QuantizedWeight, WeightFormat
    from localsgl_kernels import quant_gemv as QG

    dev = torch.device("cuda")
    torch.manual_seed(0)
    w = QuantizedWeight.quantize(torch.randn(8192, 4096, device=dev, dtype=torch.bfloat16) * 0.02,
                                 WeightFormat("int4", 128, False))
    x = torch.randn(1, 4096, device=dev, dtype=torch.bfloat16)
    res, norm_w = torch.randn(1, 4096, device=dev, dtype=torch.bfloat16), torch.rand(4096, device=dev) + 0.5
    asked = []
    real = QG._prep_spans
    monkeypatch.setattr(QG, "_prep_spans", lambda *a: asked.append(sum(n for _, n in real(*a))) or real(*a))
    out = {}
    for nbytes in (0, 4 << 20):
        monkeypatch.setattr(QG, "PREP_PREFETCH_BYTES", nbytes)
        asked.clear()
        out[nbytes] = (QG.gemv(x, w), *QG.norm_gate_up(x, res, norm_w.to(torch.bfloat16), 1e-5, w))
        torch.cuda.synchronize()
        assert all(n == min(nbytes, w.qweight.numel()) for n in asked), (nbytes, asked)
        if QG.default_config(w, 8192, "cuda").words >= 2:  # a tile that reads prepared activations
            assert asked, "no preparation launched"
    for a, b in zip(out[0], out[4 << 20]):
        assert torch.equal(a, b)
