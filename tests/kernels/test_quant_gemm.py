"""The dequantizing GEMM (kernels/quant_gemm.py) against x @ dequantize(W)ᵀ in fp64, for each
weight format, decode-sized and prefill-sized row counts, rows and columns that do not fill
a tile; and the row-count dispatch of quant_gemm.matmul."""
import pytest
import torch
from kutil import DEV, ON_GPU, gen, randn, rel_err

from localsgl.engine.layers.quant import QuantizedWeight, WeightFormat
from localsgl_kernels import quant_gemm as QM

FORMATS = [WeightFormat("int4", 32, True), WeightFormat("int4", 128, False), WeightFormat("int8", 0, True),
           WeightFormat("int8", 16, False), WeightFormat("fp8", 0, True), WeightFormat("fp8", 64, True)]
IDS = [f.label().replace(" ", "-") for f in FORMATS]
DTYPES = [torch.bfloat16, torch.float16] if ON_GPU else [torch.float32, torch.float16]


def _qw(n, k, fmt, g):
    return QuantizedWeight.quantize(torch.randn(n, k, generator=g) * k**-0.5, fmt).to(DEV)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
@pytest.mark.parametrize("m", [3, 40] if not ON_GPU else [5, 300])
def test_gemm(fmt, dtype, m):
    g = gen(21 + m)
    n, k = (72, 256) if not ON_GPU else (4096 + 48, 4096)
    w = _qw(n, k, fmt, g)
    x = randn(m, k, g=g, dtype=dtype)
    ref = x.double() @ w.dequantize(torch.float64).t()
    y = QM.gemm(x, w)
    assert y.shape == (m, n) and y.dtype == dtype
    assert rel_err(y, ref) < {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]


@pytest.mark.parametrize("fmt", FORMATS[:1] + FORMATS[2:3], ids=IDS[:1] + IDS[2:3])
def test_forced_tiles(fmt):
    g = gen(23)
    w = _qw(40, 128, fmt, g)
    x = randn(33, 128, g=g)
    ref = x.double() @ w.dequantize(torch.float64).t()
    for cfg in (QM.Config(16, 16, 32, 4, 1, 1), QM.Config(32, 32, 64, 4, 1, 2), QM.Config(16, 32, 128, 4, 1, 8),
                QM.Config(16, 32, 64, 4, 1, 2, 1)):
        assert rel_err(QM.gemm(x, w, cfg), ref) < 1e-5


@pytest.mark.parametrize("m", [1, 5, 16, 37, 64])
@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_forced_swap_ab_tiles(fmt, m):
    """The swapped tile (accᵀ = w·xᵀ, stored transposed): rows that do not fill BLOCK_M, two
    column tiles the second of them partial; int4 with and without the interleaved dot, and
    with the nibbles in the dot scaled after it (fp16 x)."""
    g = gen(29 + m)
    w = _qw(72, 256, fmt, g)
    ref64 = w.dequantize(torch.float64)
    x = randn(m, 256, g=g)
    ref = x.double() @ ref64.t()
    for cfg in (QM.Config(16, 64, 64, 4, 1, 1, 0, 0, 1), QM.Config(32, 64, 128, 4, 1, 2, 1, 0, 1),
                QM.Config(64, 128, 128, 8, 1, 4, 0, 0, 1)):
        assert rel_err(QM.gemm(x, w, cfg), ref) < 1e-5, cfg
    if fmt.kind == "int4":
        x16 = x.half()
        for cfg in (QM.Config(16, 64, 128, 4, 1, 1, 1, 1, 1), QM.Config(64, 64, 64, 4, 1, 2, 0, 1, 1)):
            assert rel_err(QM.gemm(x16, w, cfg), x16.double() @ ref64.t()) < 2e-3, cfg


@pytest.mark.parametrize("fmt", [WeightFormat("int4", 32, True), WeightFormat("int4", 128, False)], ids=["g32", "g128-asym"])
def test_scale_after_dot(fmt):
    """int4 with the stored nibbles in the dot (as fp16 1024 + u) and the group's scale and offset
    applied to its result; fp32 x ignores the variant (the plain path, exact)."""
    g = gen(28)
    w = _qw(40, 256, fmt, g)
    ref64 = w.dequantize(torch.float64)
    x = randn(20, 256, g=g, dtype=torch.float16)
    for cfg in (QM.Config(16, 32, 128, 4, 1, 1, 1, 1), QM.Config(16, 16, 64, 4, 1, 2, 0, 1)):
        assert rel_err(QM.gemm(x, w, cfg), x.double() @ ref64.t()) < 2e-3
    x32 = randn(5, 256, g=g)
    assert rel_err(QM.gemm(x32, w, QM.Config(16, 32, 128, 4, 1, 1, 1, 1)), x32.double() @ ref64.t()) < 1e-5


@pytest.mark.parametrize("fmt", [WeightFormat("int4", 32, True), WeightFormat("int4", 128, False)], ids=["g32", "g128-asym"])
def test_words_dot(fmt):
    """int4 read as int32 words, two nibbles into two 16-bit floats per operation: the same dot
    as scale_after's (equal up to the order of the Σx sums under the interpreter), plain and
    swapped tiles; fp32 x falls back to the plain path."""
    g = gen(29)
    w = _qw(40, 256, fmt, g)
    ref64 = w.dequantize(torch.float64)
    for dtype in (torch.float16, torch.bfloat16) if ON_GPU else (torch.float16,):
        x = randn(20, 256, g=g, dtype=dtype)
        for words, after in ((QM.Config(16, 32, 128, 4, 1, 1, 0, 0, 0, 1), QM.Config(16, 32, 128, 4, 1, 1, 0, 1, 0)),
                             (QM.Config(16, 64, 64, 4, 1, 2, 0, 0, 1, 1), QM.Config(16, 64, 64, 4, 1, 2, 0, 1, 1))):
            got = QM.gemm(x, w, words)
            assert rel_err(got, x.double() @ ref64.t()) < (2e-3 if dtype == torch.float16 else 1.6e-2)
            if not ON_GPU:
                assert rel_err(got, QM.gemm(x, w, after)) < 1e-6
    x32 = randn(5, 256, g=g)
    assert rel_err(QM.gemm(x32, w, QM.Config(16, 32, 128, 4, 1, 1, 0, 0, 0, 1)), x32.double() @ ref64.t()) < 1e-5


@pytest.mark.parametrize("fmt", [WeightFormat("int4", 32, True), WeightFormat("int4", 128, False),
                                 WeightFormat("int4", 64, False)], ids=["g32", "g128-asym", "g64-asym"])
def test_half_math(fmt):
    """int4 dequantized in x's 16-bit float (the group's scale and offset rounded to it), plain,
    swapped and split tiles, rows that do not fill a tile: the fp64
    reference within x's rounding, and the fp32 dequantization's tile within its own; fp32 x takes
    the plain path (exact)."""
    g = gen(31)
    w = _qw(72, 512, fmt, g)
    ref64 = w.dequantize(torch.float64)
    tiles = (QM.Config(16, 32, 128, 4, 1, 1, 1), QM.Config(16, 64, 128, 4, 2, 1, 1, 0, 1),
             QM.Config(64, 64, 256, 4, 2, 4, 1, 0, 1, 0, 2))
    for dtype in (torch.float16, torch.bfloat16) if ON_GPU else (torch.float16,):
        tol = 2e-3 if dtype == torch.float16 else 1.6e-2
        for m in (5, 40):
            x = randn(m, 512, g=g, dtype=dtype)
            ref = x.double() @ ref64.t()
            for cfg in tiles:
                got = QM.gemm(x, w, cfg._replace(half_math=1))
                assert got.dtype == dtype and rel_err(got, ref) < tol, cfg
                assert rel_err(got, QM.gemm(x, w, cfg)) < tol / 2, cfg
    x32 = randn(5, 512, g=g)
    assert rel_err(QM.gemm(x32, w, tiles[0]._replace(half_math=1)), x32.double() @ ref64.t()) < 1e-5


@pytest.mark.parametrize("m", [3, 16, 40])
@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_wide_steps(fmt, m):
    """One load and one dot per BLOCK_K step with each column's group scale gathered (``wide``),
    plain, swapped, interleaved (int4) and split: the fp64 reference; a row-scaled weight is
    unchanged by it."""
    g = gen(47 + m)
    w = _qw(72, 512, fmt, g)
    x = randn(m, 512, g=g, dtype=torch.float16)
    ref = x.double() @ w.dequantize(torch.float64).t()
    il = int(fmt.kind == "int4")
    for cfg in (QM.Config(16, 32, 128, 4, 1, 1, il, wide=1), QM.Config(32, 64, 256, 4, 1, 2, il, 0, 1, wide=1),
                QM.Config(16, 64, 128, 4, 1, 1, 0, 0, 1, split_k=2, wide=1)):
        got = QM.gemm(x, w, cfg)
        assert rel_err(got, ref) < 2e-3, cfg
        if fmt.group_size >= 512 or fmt.group_size == 0:
            assert torch.equal(got, QM.gemm(x, w, cfg._replace(wide=0)))


@pytest.mark.parametrize("sm90", [False, True])
@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_builtin_tiles(fmt, sm90):
    """The built-in CUDA tiles (no tuned file) for each row-count range, before and after
    sm_90, whole and with K split as fill_split does it: the fp64 reference."""
    g = gen(37 + sm90)
    k = 2048
    w = _qw(72, k, fmt, g)
    ref64 = w.dequantize(torch.float64)
    for m in (5, 16, 40, 100):
        cfg = QM.builtin_config(m, fmt.kind, sm90)
        x = randn(m, k, g=g, dtype=torch.float16)
        ref = x.double() @ ref64.t()
        for c in {cfg, QM.fill_split(cfg, m, w, 132)}:
            assert rel_err(QM.gemm(x, w, c), ref) < 2e-3, (m, c)


def test_fill_split():
    """K is cut in two where the output tiles are at most half the SMs and a slice keeps 8
    steps; never for fp8 or a tile that is split already."""
    g = gen(43)
    i4 = WeightFormat("int4", 128, True)
    o_proj = QuantizedWeight(i4, torch.zeros(4096, 2048, dtype=torch.uint8), torch.ones(4096, 32), None, 4096)
    gate_up = QuantizedWeight(i4, torch.zeros(28672, 2048, dtype=torch.uint8), torch.ones(28672, 32), None, 4096)
    tile = QM.builtin_config(64, "int4", True)  # 64 x 64: o_proj has 64 tiles, gate_up 448
    assert QM.fill_split(tile, 64, o_proj, 132).split_k == 2
    assert QM.fill_split(tile, 64, o_proj, 100).split_k == 1
    assert QM.fill_split(tile, 64, gate_up, 132).split_k == 1
    assert QM.fill_split(tile._replace(split_k=4), 64, o_proj, 132).split_k == 4
    fp8 = _qw(64, 4096, WeightFormat("fp8", 0, True), g)
    assert QM.fill_split(tile, 64, fp8, 132).split_k == 1
    short = _qw(64, 1024, i4, g)  # 1,024 / 128 = 8 steps: 4 a slice
    assert QM.fill_split(tile, 64, short, 132).split_k == 1


def test_default_config_tuned_nearest_and_builtin(monkeypatch):
    """A tuned tile of the weight's own N is taken as it is; one borrowed from the nearest N, or
    the built-in tile, gets fill_split's K split where its output tiles are few."""
    g = gen(61)
    o_proj = _qw(4096, 4096, WeightFormat("int4", 128, False), g)
    tuned = QM.Config(64, 64, 128, 4, 3, 4, 1, 0, 1)
    monkeypatch.setattr(QM, "_sm_count", lambda device: 132)
    monkeypatch.setattr(QM, "_sm90_or_newer", lambda device: True)
    monkeypatch.setattr(QM, "lookup_entry", lambda kind, w, m, device: (tuple(tuned), 4096))
    assert QM.default_config(64, "cuda", o_proj) == tuned  # its own shape: as tuned
    monkeypatch.setattr(QM, "lookup_entry", lambda kind, w, m, device: (tuple(tuned), 28672))
    assert QM.default_config(64, "cuda", o_proj) == tuned._replace(split_k=2)  # borrowed: 64 tiles, split
    monkeypatch.setattr(QM, "lookup_entry", lambda kind, w, m, device: None)
    assert QM.default_config(64, "cuda", o_proj) == QM.builtin_config(64, "int4", True)._replace(split_k=2)
    assert QM.default_config(100, "cuda", o_proj).split_k == 2  # 2 x 32 tiles of 64 x 128
    assert QM.default_config(200, "cuda", o_proj) == QM.builtin_config(200, "int4", True)  # 4 x 32: whole K
    assert QM.default_config(5, "cpu", o_proj) == QM.Config(16, 16, 32, 4, 1, 4)


@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_split_k(fmt):
    """K cut into 2 or 4 slices, one program each, the fp32 partials summed after: the unsplit
    tile's result up to the order of the sums, plain, swapped and (int4) words tiles; a split
    that does not tile K runs unsplit."""
    g = gen(31)
    w = _qw(48, 512, fmt, g)
    x = randn(7, 512, g=g, dtype=torch.float16 if not ON_GPU else torch.bfloat16)
    ref = x.double() @ w.dequantize(torch.float64).t()
    tiles = [QM.Config(16, 32, 64, 4, 1, 1), QM.Config(16, 64, 64, 4, 1, 1, 0, 0, 1)]
    if fmt.kind == "int4" and fmt.group_size >= 32:
        tiles.append(QM.Config(16, 32, 128, 4, 1, 1, 0, 0, 0, 1))
    tol = 2e-3 if x.dtype == torch.float16 else 1.6e-2
    for cfg in tiles:
        whole = QM.gemm(x, w, cfg)
        for split in (2, 4):
            got = QM.gemm(x, w, cfg._replace(split_k=split))
            assert got.dtype == x.dtype and rel_err(got, ref) < tol
            assert rel_err(got, whole) < (1e-3 if x.dtype == torch.float16 else 8e-3)
    assert torch.equal(QM.gemm(x, w, tiles[0]._replace(split_k=3)), QM.gemm(x, w, tiles[0]))  # 512 / 3: unsplit


@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_dequantize(fmt):
    """The Triton dequantization equals QuantizedWeight.dequantize (fp32 math, one rounding),
    whole and by a slice of rows, for N not a multiple of the row tile."""
    g = gen(25)
    w = _qw(72, 256, fmt, g)
    ref = w.dequantize(torch.float32)
    # s·q + m may be one fused multiply-add on the GPU: one rounding where torch makes two (half an
    # ulp of s·q, whose size is at most |w| + |m| even where s·q + m cancels, and half an ulp of w),
    # and the kernel's own rounding of w: at most (|s·q| + 2|w|)·2^-24 apart
    m = 0.0 if w.mins is None else w.mins.float().repeat_interleave(w.group, 1)
    bound = (3 * ref.abs() + torch.as_tensor(m).abs()) * 2**-24 + 1e-30
    assert ((QM.dequantize(w, torch.float32) - ref).abs() <= bound).all()
    # bf16: the same value rounded once more (the interpreter truncates): within one bf16 step
    bf = QM.dequantize(w, torch.bfloat16).float()
    assert ((bf - ref).abs() <= ref.abs() * 2**-7).all()
    # a slice of rows: those rows of the whole result (with offsets the GPU's fused multiply-add
    # differs from torch's two roundings, so the comparison is kernel against kernel)
    assert torch.equal(QM.dequantize(w, torch.float32, slice(8, 45)), QM.dequantize(w, torch.float32)[8:45])


@pytest.mark.parametrize("fmt", FORMATS[1:3], ids=IDS[1:3])
def test_dequant_matmul_in_chunks(fmt):
    g = gen(26)
    w = _qw(300, 128, fmt, g)
    x = randn(7, 128, g=g)
    ref = x.double() @ w.dequantize(torch.float64).t()
    # 128 rows of the dense copy at a time: three chunks, the last one short
    assert rel_err(QM.dequant_matmul(x, w, max_bytes=128 * 128 * 4), ref) < 1e-5


@pytest.mark.skipif(not ON_GPU, reason="the dispatch needs CUDA tensors")
@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
@pytest.mark.parametrize("m", [1, 4, 64])
def test_matmul_dispatch_gpu(fmt, m):
    g = gen(24)
    w = _qw(1024, 2048, fmt, g)
    x = randn(m, 2048, g=g, dtype=torch.bfloat16)
    ref = x.double() @ w.dequantize(torch.float64).t()
    # fp8 rows quantized to e4m3 on the way into _scaled_mm: a few percent
    tol = 6e-2 if fmt.kind == "fp8" and m > QM.FP8_SCALED_MM_MIN_ROWS else 1e-2
    assert rel_err(QM.matmul(x, w), ref) < tol


@pytest.mark.skipif(not ON_GPU, reason="the dispatch needs CUDA tensors")
@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_matmul_dequant_route_gpu(fmt, monkeypatch):
    monkeypatch.setattr(QM, "DEQUANT_MIN_ROWS", 64)
    g = gen(27)
    w = _qw(1024, 2048, fmt, g)
    x = randn(100, 2048, g=g, dtype=torch.bfloat16)
    ref = x.double() @ w.dequantize(torch.float64).t()
    tol = 6e-2 if fmt.kind == "fp8" and fmt.group_size == 0 else 1e-2  # per-row fp8: rows quantized for _scaled_mm
    assert rel_err(QM.matmul(x, w), ref) < tol
