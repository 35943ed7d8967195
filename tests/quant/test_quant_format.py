"""layers/quant.py: packing, round-to-nearest quantization, exact format conversions, the
torch reference matmul, and Linear layers loading quantized and deferred weights."""
from __future__ import annotations

import pytest
import torch

from localsgl.engine.layers.linear import Linear, MergedLinear
from localsgl.engine.layers.quant import (
    QuantizedWeight, RowStack, WeightFormat, concat_rows, is_quantized, join_formats, matmul, matmul_ref, pack_int4,
    parse_format, row_runs, unpack_int4, weight_format_of,
)
from localsgl.engine.layers.weight_policy import WeightPolicy, building

FORMATS = [
    WeightFormat("int4", 32, True), WeightFormat("int4", 64, False), WeightFormat("int4", 128, False),
    WeightFormat("int8", 0, True), WeightFormat("int8", 32, True), WeightFormat("int8", 16, False),
    WeightFormat("fp8", 0, True), WeightFormat("fp8", 128, True),
]


def test_pack_unpack_roundtrip():
    u = torch.randint(0, 16, (5, 64), generator=torch.Generator().manual_seed(0))
    b = pack_int4(u)
    assert b.shape == (5, 32) and b.dtype == torch.uint8
    assert torch.equal(unpack_int4(b), u.to(torch.uint8))
    assert int(b[0, 0]) == int(u[0, 0]) | (int(u[0, 1]) << 4)  # element 2j in the low nibble of byte j


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.label().replace(" ", "-"))
def test_round_to_nearest_error_is_within_half_a_step(fmt):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 256, generator=g) * 0.05
    w[3] = 0.0  # an all-zero row must not divide by zero
    q = QuantizedWeight.quantize(w, fmt)
    d = q.dequantize()
    assert d.shape == w.shape and torch.isfinite(d).all()
    assert torch.equal(d[3], torch.zeros(256))
    err = (d - w).abs().view(48, -1, q.group)
    if fmt.kind == "fp8":  # 3 mantissa bits: half an ulp is 1/16 of the value's binade
        assert float(((d - w).abs() / w.abs().clamp_min(1e-6)).median()) < 0.04
    else:
        step = q.scales.float().abs()[..., None]
        assert bool((err <= step * 0.5 + 1e-6).all())
    assert q.nbytes == fmt.nbytes(48, 256, q.scales.element_size())
    # quantizing the dequantized values again gives them back (they are on the grid)
    assert torch.allclose(QuantizedWeight.quantize(d, fmt).dequantize(), d, atol=1e-6, rtol=1e-3)


def test_symmetric_int4_uses_the_full_range_and_asymmetric_beats_it_on_skewed_rows():
    w = torch.rand(8, 128, generator=torch.Generator().manual_seed(2))  # all positive
    sym = QuantizedWeight.quantize(w, WeightFormat("int4", 128, True))
    asym = QuantizedWeight.quantize(w, WeightFormat("int4", 128, False))
    assert int(sym.int_values().max()) == 7
    assert (asym.dequantize() - w).abs().mean() < 0.6 * (sym.dequantize() - w).abs().mean()


@pytest.mark.parametrize("src,dst", [
    (WeightFormat("int4", 32, True), WeightFormat("int8", 32, True)),
    (WeightFormat("int4", 64, False), WeightFormat("int8", 16, False)),
    (WeightFormat("int8", 32, True), WeightFormat("int8", 16, False)),
    (WeightFormat("int4", 128, True), WeightFormat("int4", 32, True)),
])
def test_to_format_is_exact(src, dst):
    w = QuantizedWeight.quantize(torch.randn(16, 128, generator=torch.Generator().manual_seed(3)), src)
    c = w.to_format(dst)
    assert c.fmt == dst and torch.equal(c.dequantize(), w.dequantize())
    with pytest.raises(ValueError):
        c.to_format(WeightFormat("fp8", 0, True))


def test_concat_rows_joins_mixed_formats_exactly():
    g = torch.Generator().manual_seed(4)
    parts = [QuantizedWeight.quantize(torch.randn(n, 64, generator=g), f) for n, f in (
        (8, WeightFormat("int4", 32, False)), (4, WeightFormat("int4", 32, True)), (4, WeightFormat("int8", 16, True)))]
    assert join_formats([p.fmt for p in parts], 64) == WeightFormat("int8", 16, False)
    assert join_formats([parts[0].fmt, parts[1].fmt], 64) == WeightFormat("int4", 32, False)
    assert join_formats([WeightFormat("fp8", 0, True), parts[0].fmt], 64) is None
    for sel in ([0, 1], [0, 1, 2]):
        j = concat_rows([parts[i] for i in sel])
        assert torch.equal(j.dequantize(), torch.cat([parts[i].dequantize() for i in sel]))


@pytest.mark.parametrize("fmt", FORMATS[:4] + FORMATS[6:7], ids=lambda f: f.label().replace(" ", "-"))
def test_matmul_ref_and_embedding(fmt):
    g = torch.Generator().manual_seed(5)
    q = QuantizedWeight.quantize(torch.randn(3000, 128, generator=g) * 0.1, fmt)
    x = torch.randn(5, 128, generator=g)
    torch.testing.assert_close(matmul_ref(x, q), x @ q.dequantize().t(), rtol=1e-5, atol=1e-5)
    ids = torch.tensor([[7, 2999], [0, 7]])
    torch.testing.assert_close(q.embedding(ids, torch.float32), q.dequantize()[ids])


def test_fitted_groups():
    f = WeightFormat("int4", 128, False)
    assert f.fitted(4096) is f and f.fitted(576) == WeightFormat("int4", 64, False)
    assert f.fitted(40) is None and WeightFormat("int8", 128).fitted(48) == WeightFormat("int8", 16)
    assert WeightFormat("int8", 0).fitted(576) == WeightFormat("int8", 0) and f.fitted(97) is None


def test_parse_format_defaults():
    assert parse_format("int4") == WeightFormat("int4", 128, False)
    assert parse_format("INT8") == WeightFormat("int8", 0, True)
    assert parse_format("fp8", 0) == WeightFormat("fp8", 0, True)
    with pytest.raises(ValueError):
        parse_format("int3")
    with pytest.raises(ValueError):
        WeightFormat("int4", 0)
    assert parse_format("int4", 64).group_size == 64 and parse_format("int8", 16).group_size == 16
    for method, group in (("int4", 100), ("int4", 16), ("int8", 8), ("fp8", 96)):
        with pytest.raises(ValueError, match="power of two"):
            parse_format(method, group)


def _policy(keep=True, quantize=None):
    return WeightPolicy(keep_quantized=keep, quantize=quantize, dtype=torch.float32, device=torch.device("cpu"))


def _qkv_parts(g, q: int, kv: int, k: int) -> tuple[dict, torch.Tensor]:
    """q/k in int4 g32 with offsets and v in int8 g16 (a GGUF Q4_K_M layer whose v is Q6_K), and
    their dense stack."""
    fq, fv = WeightFormat("int4", 32, False), WeightFormat("int8", 16, True)
    parts = {name: QuantizedWeight.quantize(torch.randn(n, k, generator=g), f)
             for name, n, f in (("q", q, fq), ("k", kv, fq), ("v", kv, fv))}
    return parts, torch.cat([p.dequantize() for p in parts.values()])


def test_merged_linear_joins_quantized_parts_and_dequantizes_when_told():
    """Parts whose fused kernels take no row blocks (anything but q/k/v) join in one format."""
    g = torch.Generator().manual_seed(6)
    qkv, dense = _qkv_parts(g, 8, 4, 64)
    parts = dict(zip(("a", "b", "c"), qkv.values()))
    x = torch.randn(3, 64, generator=g)
    for keep in (True, False):
        with building(_policy(keep)):
            m = MergedLinear(64, {"a": 8, "b": 4, "c": 4})
        assert not m.row_blocks and (m.weight is None) == keep  # kept quantized: nothing allocated before loading
        for name, p in parts.items():
            m.load_shard(name, p)
        assert isinstance(m.weight, QuantizedWeight) == keep
        if keep:
            assert m.weight.fmt == WeightFormat("int8", 16, False)
        torch.testing.assert_close(m(x), x @ dense.t(), rtol=1e-5, atol=1e-5)
    plain = MergedLinear(64, {"a": 8, "b": 4, "c": 4})  # no policy: dense, quantized parts dequantized
    for name, p in parts.items():
        plain.load_shard(name, p)
    assert torch.equal(plain.weight, dense)


def test_row_runs_keep_q_k_v_in_their_own_formats_where_joining_widens_them():
    i4, i4s, i8 = WeightFormat("int4", 32, False), WeightFormat("int4", 32, True), WeightFormat("int8", 16, True)
    sizes = [4096, 1024, 1024]
    # Q4_K q/k with a Q6_K v: joined, all rows would be int8 g16 with offsets (10 bits a weight)
    assert row_runs([i4, i4, i8], sizes, 4096, split_ok=True) == [([0, 1], i4), ([2], i8)]
    assert row_runs([i4, i4, i8], sizes, 4096, split_ok=False) == [([0, 1, 2], WeightFormat("int8", 16, False))]
    # equal formats, or a join that costs little (sym int4 -> asym int4 adds one offset per group): one weight
    assert row_runs([i4, i4, i4], sizes, 4096, split_ok=True) == [([0, 1, 2], i4)]
    assert row_runs([i4, i4, i4s], sizes, 4096, split_ok=True) == [([0, 1, 2], i4)]
    assert row_runs([WeightFormat("fp8", 0, True), i4, i4], sizes, 4096, split_ok=True) is None


def test_merged_linear_keeps_row_blocks_that_joining_would_widen():
    g = torch.Generator().manual_seed(16)
    parts, dense = _qkv_parts(g, 64, 32, 128)
    fq, fv = parts["q"].fmt, parts["v"].fmt
    x = torch.randn(5, 128, generator=g)
    with building(_policy(True)):
        m = MergedLinear(128, {"q": 64, "k": 32, "v": 32})
    assert m.row_blocks  # quant.keeps_row_blocks: the q/k/v kernels take a RowStack
    for name, p in parts.items():
        m.load_shard(name, p)
    w = m.weight
    assert isinstance(w, RowStack) and is_quantized(w) and w.shape == (128, 128)
    assert weight_format_of(w) == f"{fq.label()} + {fv.label()}"  # what `info` shows
    assert [p.fmt for p in w.parts] == [fq, fv] and [p.out_features for p in w.parts] == [96, 32]
    assert w.nbytes == sum(p.nbytes for p in parts.values())  # nothing widened
    assert torch.equal(w.dequantize(), dense) and torch.equal(w.dequantize(rows=slice(90, 100)), dense[90:100])
    for rows in (slice(3, 40), slice(100, None), slice(None, 96), slice(50, 50), slice(0, 128, 3),
                 torch.tensor([127, 0, 95, 96])):  # in one part, the second alone, empty, strided, gathered
        assert torch.equal(w.dequantize(torch.bfloat16, rows), dense.bfloat16()[rows]), rows
    torch.testing.assert_close(m(x), x @ dense.t(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(matmul(x.bfloat16(), w).float(), x @ dense.t(), rtol=2e-2, atol=2e-1)
    bias = torch.randn(128, generator=g)
    torch.testing.assert_close(matmul(x, w, bias), x @ dense.t() + bias, rtol=1e-5, atol=1e-5)
    assert [n for n, _ in m.named_buffers()] == ["weight.parts.0.qweight", "weight.parts.0.scales", "weight.parts.0.mins",
                                                  "weight.parts.1.qweight", "weight.parts.1.scales"]


def test_linear_quantizes_dense_weights_at_load_under_a_quantizing_policy():
    g = torch.Generator().manual_seed(7)
    w = torch.randn(32, 128, generator=g)
    fmt = WeightFormat("int8", 0, True)
    with building(_policy(quantize=fmt)):
        lin = Linear(128, 32)
    lin.set_weight(w)
    assert isinstance(lin.weight, QuantizedWeight) and lin.weight.fmt == fmt
    assert torch.equal(lin.weight.dequantize(), QuantizedWeight.quantize(w, fmt).dequantize())
    with building(_policy(quantize=WeightFormat("int4", 128, False))):
        fitted = Linear(96, 8)  # 96 inputs are not whole groups of 128: groups of 32
        odd = Linear(40, 8)  # no power-of-two group of at least 32 divides 40: stays dense
    fitted.set_weight(torch.randn(8, 96, generator=g))
    assert fitted.weight.fmt == WeightFormat("int4", 32, False)
    odd.set_weight(torch.randn(8, 40, generator=g))
    assert isinstance(odd.weight, torch.nn.Parameter)
    with pytest.raises(ValueError, match="expected"):
        lin.set_weight(torch.randn(16, 128))
