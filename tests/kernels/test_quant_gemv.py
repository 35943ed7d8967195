"""The quantized one-row GEMVs (kernels/quant_gemv.py) against fp64 torch references on the
dequantized weight: plain GEMV, norm+gate_up+silu and norm+qkv+rotary+KV store, for each
weight format (int4 symmetric/asymmetric in groups, int8 per row and in groups, fp8)."""
import pytest
import torch
from kutil import DEV, ON_GPU, gen, randn, rel_err

from localsgl.engine.layers.quant import QuantizedWeight, RowStack, WeightFormat
from localsgl.engine.layers.rotary import RotaryEmbedding
from localsgl_kernels import gemv as G
from localsgl_kernels import quant_gemv as QG
from localsgl_kernels import quant_words as QW

FORMATS = [WeightFormat("int4", 32, True), WeightFormat("int4", 64, False), WeightFormat("int8", 0, True),
           WeightFormat("int8", 16, False), WeightFormat("fp8", 0, True), WeightFormat("fp8", 32, True)]
IDS = [f.label().replace(" ", "-") for f in FORMATS]
DTYPES = [torch.bfloat16, torch.float16] if ON_GPU else [torch.float32, torch.bfloat16]


def _qw(n, k, fmt, g, scale=1.0):
    """A weight whose default tiles multiply the activations as they are: these tests hold the
    kernels to the exact product; test_quant_int8act.py holds the int8-activation tiles (the
    CUDA default) to the product with the activations they round."""
    w = torch.randn(n, k, generator=g) * (scale * k**-0.5)
    w = QuantizedWeight.quantize(w, fmt).to(DEV)
    w.int8_activations = False
    return w


def _tol(dtype):
    return {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_gemv(fmt, dtype):
    g = gen(11)
    n, k = (64, 128) if not ON_GPU else (4096, 14336)
    w = _qw(n, k, fmt, g)
    x = randn(1, k, g=g, dtype=dtype)
    ref = x.double() @ w.dequantize(torch.float64).t()
    y = QG.gemv(x, w)
    assert y.shape == (1, n) and y.dtype == dtype and rel_err(y, ref) < _tol(dtype)
    y32 = QG.gemv(x, w, out_dtype=torch.float32)
    assert y32.dtype == torch.float32 and rel_err(y32, ref) < _tol(dtype)


@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_norm_gate_up(fmt):
    g = gen(12)
    dtype = DTYPES[0]
    h, i = (128, 48) if not ON_GPU else (4096, 14336)
    x, res = randn(1, h, g=g, dtype=dtype), randn(1, h, g=g, dtype=dtype)
    nw = (1 + 0.1 * randn(h, g=g)).to(dtype)
    w = _qw(2 * i, h, fmt, g)
    ra, rr = G.norm_gate_up_ref(x.double(), res.double(), nw.double(), 1e-6, w.dequantize(torch.float64))
    a, r = QG.norm_gate_up(x, res, nw, 1e-6, w)
    assert a.shape == (1, i) and rel_err(a, ra) < 2 * _tol(dtype)
    assert torch.allclose(r.float(), rr.float(), rtol=2**-7 if dtype == torch.bfloat16 else 1e-6)


@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
@pytest.mark.parametrize("has_res,has_bias", [(True, False), (False, True)])
def test_norm_qkv(fmt, has_res, has_bias):
    g = gen(13 + has_res)
    dtype = DTYPES[0]
    hq, hkv, d, h = (4, 2, 32, 128) if not ON_GPU else (32, 8, 128, 4096)
    n = (hq + 2 * hkv) * d
    x = randn(1, h, g=g, dtype=dtype)
    res = randn(1, h, g=g, dtype=dtype) if has_res else None
    nw = (1 + 0.1 * randn(h, g=g)).to(dtype)
    w = _qw(n, h, fmt, g)
    bias = randn(n, g=g, dtype=dtype, scale=0.1) if has_bias else None
    rope = RotaryEmbedding(d, 64, 10000.0, None, device=DEV)
    pos, loc = torch.tensor([37], device=DEV), torch.tensor([2], device=DEV)
    kc, vc = randn(4, hkv, d, g=g, dtype=dtype), randn(4, hkv, d, g=g, dtype=dtype)
    kc0 = kc.clone()
    rq, rk, rv, _ = G.norm_qkv_ref(x.double(), None if res is None else res.double(), nw.double(), 1e-5,
                                   w.dequantize(torch.float64), None if bias is None else bias.double(),
                                   rope.cos_sin.double(), pos, hq, hkv)
    q, _ = QG.norm_qkv(x, res, nw, 1e-5, w, bias, rope.cos_sin, pos, loc, kc, vc, hq, hkv)
    t = 2 * _tol(dtype)
    assert rel_err(q, rq) < t and rel_err(kc[2], rk[0]) < t and rel_err(vc[2], rv[0]) < t
    assert torch.equal(kc[[0, 1, 3]], kc0[[0, 1, 3]])


@pytest.mark.parametrize("has_res,blocks,words", [(True, 2, False), (False, 2, False), (True, 3, False),
                                                  (True, 2, True), (False, 2, True)])
def test_norm_qkv_row_stack(has_res, blocks, words, monkeypatch):
    """q/k in int4 g32 with offsets, v in int8 g16 (a GGUF Q4_K_M layer whose v is Q6_K): one
    launch for both blocks; q, k and v in three formats: one launch per block.  Each writes its
    own heads; equal to the reference on the stack.  ``words``: the CUDA default's tiles (int4
    words over prepared activations, the second block words over the raw ones) on any device."""
    if words and not ON_GPU:
        monkeypatch.setattr(QG, "default_config", lambda w, rows, dev: QG.Config(4, 64, 4, 1, 1, 2))
    g = gen(15 + has_res + blocks)
    dtype = DTYPES[0]
    hq, hkv, d, h = (4, 2, 32, 128) if not ON_GPU else (32, 8, 128, 4096)
    x = randn(1, h, g=g, dtype=dtype)
    res = randn(1, h, g=g, dtype=dtype) if has_res else None
    nw = (1 + 0.1 * randn(h, g=g)).to(dtype)
    i4, i8 = WeightFormat("int4", 32, False), WeightFormat("int8", 16, True)
    parts = ([_qw((hq + hkv) * d, h, i4, g)] if blocks == 2 else
             [_qw(hq * d, h, i4, g), _qw(hkv * d, h, WeightFormat("int4", 64, True), g)]) + [_qw(hkv * d, h, i8, g)]
    w = RowStack(parts)
    assert QG.norm_qkv_supported(w, d, d, DEV) and not QG.gemv_supported(w, DEV)
    pair = QG._pair_configs(w.parts, d, h, DEV)
    assert (pair is not None) == (blocks == 2)
    if pair is not None:  # one preparation lays the activations out for both blocks: forced, or CUDA's default
        assert (pair[1].words == pair[0].words >= 2) == (words or ON_GPU)
    bias = randn(w.out_features, g=g, dtype=dtype, scale=0.1)
    rope = RotaryEmbedding(d, 64, 10000.0, None, device=DEV)
    pos, loc = torch.tensor([21], device=DEV), torch.tensor([1], device=DEV)
    kc, vc = randn(3, hkv, d, g=g, dtype=dtype), randn(3, hkv, d, g=g, dtype=dtype)
    kc0, vc0 = kc.clone(), vc.clone()
    rq, rk, rv, rr = G.norm_qkv_ref(x.double(), None if res is None else res.double(), nw.double(), 1e-5,
                                    w.dequantize(torch.float64), bias.double(), rope.cos_sin.double(), pos, hq, hkv)
    q, r = QG.norm_qkv(x, res, nw, 1e-5, w, bias, rope.cos_sin, pos, loc, kc, vc, hq, hkv)
    t = 2 * _tol(dtype)
    assert rel_err(q, rq) < t and rel_err(kc[1], rk[0]) < t and rel_err(vc[1], rv[0]) < t
    assert torch.equal(kc[[0, 2]], kc0[[0, 2]]) and torch.equal(vc[[0, 2]], vc0[[0, 2]])
    if has_res:
        assert torch.allclose(r.float(), rr.float(), rtol=2**-7 if dtype == torch.bfloat16 else 1e-6)


def test_configs_and_support():
    dev = "cuda" if ON_GPU else "cpu"
    g = gen(14)
    w = _qw(64, 576, WeightFormat("int4", 32, False), g)  # SmolLM2's hidden size: 9 x 64
    cfg = QG.default_config(w, 64, dev)
    assert cfg is not None and 576 % cfg.block_k == 0 and cfg.block_k % 32 == 0
    assert QG.gemv_supported(w, dev)
    odd = _qw(6, 128, WeightFormat("int8", 0, True), g)  # 6 rows do not split into two row blocks of 4
    assert not QG.gemv_supported(odd, "cpu")
    x = randn(1, 576, g=g)
    assert rel_err(QG.gemv(x, w, config=QG.Config(2, 64)), x.double() @ w.dequantize(torch.float64).t()) < 1e-5


WORD_FORMATS = [WeightFormat("int4", 32, True), WeightFormat("int4", 64, False), WeightFormat("int4", 128, False),
                WeightFormat("int8", 0, True), WeightFormat("int8", 16, False)]
WORD_IDS = [f.label().replace(" ", "-") for f in WORD_FORMATS]


@pytest.mark.parametrize("fmt", WORD_FORMATS, ids=WORD_IDS)
def test_gemv_words_and_split_k(fmt):
    """The sweep's variants: int4 / int8 as int32 words (nibbles / bytes read as subnormal
    floats), split-K (partials, then their sum), and both, at activation scales far from 1 (the
    words path pre-scales x by up to 2^89 and its products by 2^-60)."""
    g = gen(15)
    n, k = 64, 512
    w = _qw(n, k, fmt, g)
    for scale in (1.0, 1e8, 1e-8):
        x = randn(1, k, g=g, scale=scale)
        ref = x.double() @ w.dequantize(torch.float64).t()
        for cfg in (QG.Config(8, 256, 4, 1, 1, 1), QG.Config(4, 128, 4, 1, 2, 1), QG.Config(16, 128, 4, 1, 4, 0),
                    QG.Config(8, 256, 4, 1, 1, 2), QG.Config(4, 128, 4, 1, 2, 2)):
            y = QG.gemv(x, w, out_dtype=torch.float32, config=cfg)
            assert rel_err(y, ref) < 1e-5, (cfg, scale)
    xb = randn(1, k, g=g, dtype=torch.bfloat16)
    y = QG.gemv(xb, w, config=QG.Config(4, 256, 4, 1, 2, 1))
    assert y.dtype == torch.bfloat16 and rel_err(y, xb.double() @ w.dequantize(torch.float64).t()) < 2e-2


def test_words_apply():
    g = gen(16)
    cfg = QG.Config(8, 128, 4, 1, 1, 1)
    assert QG.words_apply(_qw(16, 128, WeightFormat("int4", 32, False), g), cfg)
    assert not QG.words_apply(_qw(16, 128, WeightFormat("int4", 32, False), g), cfg._replace(words=0))
    assert QG.words_apply(_qw(16, 128, WeightFormat("int8", 0, True), g), cfg)
    assert not QG.words_apply(_qw(16, 128, WeightFormat("int8", 8, True), g), cfg)  # groups below a chunk
    fp8 = _qw(16, 128, WeightFormat("fp8", 0, True), g)
    assert not QG.words_apply(fp8, cfg)  # ignored: the plain fp8 path, still exact
    x = randn(1, 128, g=g)
    assert rel_err(QG.gemv(x, fp8, config=cfg), x.double() @ fp8.dequantize(torch.float64).t()) < 1e-5


def test_cuda_default_tile_without_a_tuned_one():
    """Where no tuned tile applies, CUDA takes the words GEMV over activations prepared as int8
    (dp4a) for int4 and int8, over exact prepared activations where the weight's int8_activations
    is off (the engine's debug switch), and the byte tile where words do not apply (int8 groups
    below a chunk, fp8); the CPU keeps its small byte tile."""
    g = gen(18)
    int4 = _qw(64, 4096, WeightFormat("int4", 128, False), g).to("cpu")  # a CPU weight: no tuned lookup
    int8 = _qw(64, 4096, WeightFormat("int8", 0, True), g).to("cpu")
    del int4.int8_activations, int8.int8_activations  # the class default: on
    # two stages: each step's weight words loaded a step ahead
    assert QG.default_config(int4, 64, "cuda") == QG.Config(8, 1024, 4, 2, 1, 3)
    assert QG.default_config(int4, 4, "cuda") == QG.Config(4, 1024, 4, 2, 1, 3)  # row blocks of the caller
    assert QG.default_config(int8, 64, "cuda") == QG.Config(8, 512, 4, 2, 1, 3)
    assert QG._meta(int4, QG.default_config(int4, 64, "cuda"), torch.device("cpu"))["AHEAD"]
    int4.int8_activations = int8.int8_activations = False
    assert QG.default_config(int4, 64, "cuda") == QG.Config(8, 1024, 4, 2, 1, 2)
    assert QG.default_config(int8, 64, "cuda") == QG.Config(8, 512, 4, 2, 1, 2)
    int8_g8 = _qw(64, 128, WeightFormat("int8", 8, True), g).to("cpu")
    assert QG.default_config(int8_g8, 64, "cuda").words == 0
    fp8 = _qw(64, 4096, WeightFormat("fp8", 0, True), g).to("cpu")
    assert QG.default_config(fp8, 64, "cuda") == QG.Config(8, 128, 4, 1, 1, 0)
    assert QG.default_config(int4, 64, "cpu").words == 0


def test_tuned_int8_activation_tile_follows_the_switch(monkeypatch):
    """A tuned tile that selects int8 activations keeps its shape but streams exact activations
    (words 2) for a weight whose int8_activations is off."""
    w = _qw(64, 4096, WeightFormat("int4", 128, False), gen(20)).to("cpu")
    monkeypatch.setattr(QG, "lookup", lambda kind, w, m, dev: (8, 1024, 8, 1, 2, 3))
    w.int8_activations = True
    assert QG.default_config(w, 64, "cuda") == QG.Config(8, 1024, 8, 1, 2, 3)
    w.int8_activations = False
    assert QG.default_config(w, 64, "cuda") == QG.Config(8, 1024, 8, 1, 2, 2)


@pytest.mark.parametrize("fmt", [WORD_FORMATS[0], WORD_FORMATS[4]], ids=[WORD_IDS[0], WORD_IDS[4]])
def test_fused_words_prepared_row_not_a_power_of_two(fmt):
    """Activations prepared in one pass (the normed row in one program) for a hidden size that is
    not a power of two: the program's block is padded and masked, the residual written once."""
    g = gen(19)
    h, i = 160, 16
    x, res = randn(1, h, g=g), randn(1, h, g=g)
    nw = 1 + 0.1 * randn(h, g=g)
    w = _qw(2 * i, h, fmt, g)
    ra, rr = G.norm_gate_up_ref(x.double(), res.double(), nw.double(), 1e-6, w.dequantize(torch.float64))
    a, r = QG.norm_gate_up(x, res, nw, 1e-6, w, config=QG.Config(8, 32, 4, 1, 1, 2))
    assert rel_err(a, ra) < 1e-5 and torch.equal(r, x + res)


@pytest.mark.parametrize("words,stages", [(1, 1), (2, 1), (2, 2), (2, 3)])
@pytest.mark.parametrize("fmt", WORD_FORMATS[:2] + WORD_FORMATS[4:], ids=WORD_IDS[:2] + WORD_IDS[4:])
def test_fused_words(fmt, words, stages):
    """norm + gate/up and norm + qkv + rotary + KV store with the words variants, the activations
    prepared inside the loop (1) or by a kernel of their own (2; stages 2 / 3: the weight words 1 / 2
    steps ahead) (their tile's split_k is ignored: the norm needs whole rows)."""
    g = gen(17)
    h, i = 256, 48
    x, res = randn(1, h, g=g), randn(1, h, g=g)
    nw = 1 + 0.1 * randn(h, g=g)
    cfg = QG.Config(8, 64 if stages > 1 else 128, 4, stages, 2, words)
    w = _qw(2 * i, h, fmt, g)
    ra, rr = G.norm_gate_up_ref(x.double(), res.double(), nw.double(), 1e-6, w.dequantize(torch.float64))
    a, r = QG.norm_gate_up(x, res, nw, 1e-6, w, config=cfg)
    assert rel_err(a, ra) < 1e-5 and torch.allclose(r.double(), rr, rtol=1e-6)
    hq, hkv, d = 4, 2, 32
    w = _qw((hq + 2 * hkv) * d, h, fmt, g)
    rope = RotaryEmbedding(d, 64, 10000.0, None, device=DEV)
    pos, loc = torch.tensor([37], device=DEV), torch.tensor([2], device=DEV)
    kc, vc = randn(4, hkv, d, g=g), randn(4, hkv, d, g=g)
    rq, rk, rv, _ = G.norm_qkv_ref(x.double(), res.double(), nw.double(), 1e-5, w.dequantize(torch.float64), None,
                                   rope.cos_sin.double(), pos, hq, hkv)
    q, r = QG.norm_qkv(x, res, nw, 1e-5, w, None, rope.cos_sin, pos, loc, kc, vc, hq, hkv, config=cfg)
    assert rel_err(q, rq) < 1e-5 and rel_err(kc[2], rk[0]) < 1e-5 and rel_err(vc[2], rv[0]) < 1e-5
    assert torch.equal(r, x + res)  # the residual is written once, before the words loop
    kc2, vc2 = kc.clone(), vc.clone()  # the first layer: no residual to add
    q2, _ = QG.norm_qkv(r, None, nw, 1e-5, w, None, rope.cos_sin, pos, loc, kc2, vc2, hq, hkv, config=cfg)
    assert rel_err(q2, rq) < 1e-5 and rel_err(kc2[2], rk[0]) < 1e-5


@pytest.fixture
def dense_fp8(monkeypatch):
    monkeypatch.setattr(QG, "DENSE_FP8", True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_rows_through_the_dense_full_k_gemvs(dense_fp8, dtype):
    """fp8 with one scale per row through gemv.py's kernels (QG.DENSE_FP8): the plain GEMV (full-K
    and K-loop), norm + gate_up and norm + qkv + rotary + KV store, by the other routes' checks."""
    fmt = WeightFormat("fp8", 0, True)
    w = _qw(64, 128, fmt, gen(21))
    assert QG._dense_tiles(w, None, 64, "gemv") and not QG._dense_tiles(w, QG.Config(4, 64), 64, "gemv")
    assert not QG._dense_tiles(_qw(64, 128, WeightFormat("fp8", 32, True), gen(21)), None, 64, "gemv")
    test_gemv(fmt, dtype)  # on the GPU its K (14336) takes the K-loop GEMV, as here the next one
    g = gen(22)
    long_k = _qw(64, 8256, fmt, g)  # past the full-K kernels: the K-loop plain GEMV
    assert QG._dense_tiles(long_k, None, 64, "gemv") and not QG._dense_tiles(long_k, None, 64, "gate_up")
    x = randn(1, 8256, g=g, dtype=dtype)
    assert rel_err(QG.gemv(x, long_k), x.double() @ long_k.dequantize(torch.float64).t()) < _tol(dtype)
    test_norm_gate_up(fmt)
    test_norm_qkv(fmt, True, False)
    test_norm_qkv(fmt, False, True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_rows_through_the_byte_tiles(monkeypatch, dtype):
    """The same fp8 format with QG.DENSE_FP8 off (the route before the dense GEMVs, kept for
    A/B runs): the byte tiles of this module, by the same checks."""
    monkeypatch.setattr(QG, "DENSE_FP8", False)
    fmt = WeightFormat("fp8", 0, True)
    assert not QG._dense_tiles(_qw(64, 128, fmt, gen(21)), None, 64, "gemv")
    test_gemv(fmt, dtype)
    test_norm_gate_up(fmt)
    test_norm_qkv(fmt, True, False)


@pytest.mark.parametrize("one_pass", [True, False])
def test_prepared_activations_for_two_word_widths(one_pass, monkeypatch):
    """One preparation with a second layout (int8 words of another step) writes what two
    separate preparations write, and the residual once."""
    if not one_pass:
        monkeypatch.setattr(QW, "ONE_PASS_MAX_K", 0)
    g = gen(41)
    k = 512
    w4, w8 = _qw(8, k, WeightFormat("int4", 32, False), g), _qw(8, k, WeightFormat("int8", 16, False), g)
    x, res = randn(k, g=g, dtype=DTYPES[0]), randn(k, g=g, dtype=DTYPES[0])
    nw = (1 + 0.1 * randn(k, g=g)).to(DTYPES[0])
    r1, r2 = torch.empty_like(x), torch.empty_like(x)
    both = QW.prepare_activations(w4, x, res, nw, 1e-5, r1, 128, (w8, 64))
    one = QW.prepare_activations(w4, x, res, nw, 1e-5, r2, 128) + QW.prepare_activations(w8, x, res, nw, 1e-5, r2, 64)
    assert len(both) == 4 and all(torch.equal(a, b) for a, b in zip(both, one)) and torch.equal(r1, r2)


@pytest.mark.parametrize("split", [1, 2])
def test_prepared_row(monkeypatch, split):
    """gemv(prepared=prepared_row(...)) over int8 activations (words 3): unfilled, it prepares them
    itself (and zeroes its fp32 output for two K halves) into the row's output; filled by the kernel
    before, it reads them as they are; the result is the plain call's either way."""
    cfg = QG.Config(4, 64, 4, 1, split, 3)
    monkeypatch.setattr(QG, "default_config", lambda w, rows, dev: cfg)
    g = gen(61)
    w = _qw(32, 256, WeightFormat("int4", 64, False), g)
    x = randn(1, 256, g=g)
    plain = QG.gemv(x, w, out_dtype=torch.float32)
    row = QG.prepared_row(w, x.dtype, torch.float32, x.device)
    assert row is not None and row.zero == (split == 2) and row.tile[0] == cfg
    row.out.fill_(7.0)  # what an unzeroed output would add the halves to
    y = QG.gemv(x, w, out_dtype=torch.float32, prepared=row)
    assert y is row.out and torch.equal(y, plain)
    row = QG.prepared_row(w, x.dtype, torch.float32, x.device)
    row.xp, row.xs = QW.prepare_activations(w, x.reshape(-1), None, None, 0.0, None, cfg.block_k, int8=True,
                                            zero=row.out if row.zero else None)
    row.filled = True
    assert torch.equal(QG.gemv(torch.full_like(x, float("nan")), w, out_dtype=torch.float32, prepared=row), plain)
    monkeypatch.setattr(QG, "default_config", lambda w, rows, dev: cfg._replace(words=2))  # fp32 activations
    assert QG.prepared_row(w, x.dtype, torch.float32, x.device) is None
