"""The fused one-row GEMV kernels (kernels/gemv.py) against fp64 torch references: the
norm+qkv+rotary+KV-store stream (with and without residual and bias, GQA heads, rows
of the KV pool left untouched), norm+gate_up+silu, and the plain GEMV; both program shapes
(full-K, including a K that is not a power of two, and K-loop) are forced explicitly."""
import pytest
import torch
from kutil import DEV, ELEM_DTYPES, ON_GPU, gen, randn, rel_err, tol

from localsgl.engine.layers.rotary import RotaryEmbedding
from localsgl_kernels import gemv as G
from localsgl_kernels import gemv_tiles as T

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 256}
SHAPES = [(4, 2, 32, 64), (6, 2, 16, 96)] if not ON_GPU else [(32, 8, 128, 4096), (12, 2, 64, 1536)]


def _tol(dtype):
    return 2 * tol(dtype)


def _same_sum(r, s_ref):
    """Exact on the GPU; the interpreter rounds fp32 -> bf16 by truncation: one ulp there."""
    if ON_GPU or r.dtype != torch.bfloat16:
        return torch.equal(r, s_ref)
    return torch.allclose(r.float(), s_ref.float(), rtol=2**-7, atol=0)


@pytest.mark.parametrize("dtype", ELEM_DTYPES)
@pytest.mark.parametrize("hq,hkv,d,h", SHAPES)
@pytest.mark.parametrize("has_res,has_bias", [(True, False), (False, True), (True, True)])
def test_norm_qkv(dtype, hq, hkv, d, h, has_res, has_bias):
    g = gen(hq * 1000 + h + has_res * 7 + has_bias)
    n = (hq + 2 * hkv) * d
    x = randn(1, h, g=g, dtype=dtype)
    res = randn(1, h, g=g, dtype=dtype) if has_res else None
    nw = (1 + 0.1 * randn(h, g=g)).to(dtype)
    w = randn(n, h, g=g, dtype=dtype, scale=h**-0.5)
    bias = randn(n, g=g, dtype=dtype, scale=0.1) if has_bias else None
    rope = RotaryEmbedding(d, 300, 500000.0, LLAMA3, device=DEV)
    pos = torch.tensor([257], device=DEV)
    loc = torch.tensor([5], device=DEV)
    kc = randn(9, hkv, d, g=g, dtype=dtype)
    vc = randn(9, hkv, d, g=g, dtype=dtype)
    kc0, vc0 = kc.clone(), vc.clone()
    rq, rk, rv, rr = G.norm_qkv_ref(
        x.double(), None if res is None else res.double(), nw.double(), 1e-5, w.double(),
        None if bias is None else bias.double(), rope.cos_sin.double(), pos, hq, hkv)
    q, r = G.norm_qkv(x, res, nw, 1e-5, w, bias, rope.cos_sin, pos, loc, kc, vc, hq, hkv)
    assert q.shape == (1, hq, d) and r.shape == (1, h)
    assert rel_err(q, rq) < _tol(dtype)
    assert rel_err(kc[5], rk[0]) < _tol(dtype) and rel_err(vc[5], rv[0]) < _tol(dtype)
    assert _same_sum(r, (x.float() + res.float()).to(dtype) if has_res else x)
    others = [i for i in range(9) if i != 5]
    assert torch.equal(kc[others], kc0[others]) and torch.equal(vc[others], vc0[others])
    if has_res:
        assert r.data_ptr() != res.data_ptr()


@pytest.mark.parametrize("dtype", ELEM_DTYPES)
@pytest.mark.parametrize("h,i", [(64, 96), (32, 40)] if not ON_GPU else [(4096, 14336), (1536, 8960)])
def test_norm_gate_up(dtype, h, i):
    g = gen(h + i)
    x = randn(1, h, g=g, dtype=dtype)
    res = randn(1, h, g=g, dtype=dtype)
    nw = (1 + 0.1 * randn(h, g=g)).to(dtype)
    w = randn(2 * i, h, g=g, dtype=dtype, scale=h**-0.5)
    ra, rr = G.norm_gate_up_ref(x.double(), res.double(), nw.double(), 1e-6, w.double())
    a, r = G.norm_gate_up(x, res, nw, 1e-6, w)
    assert a.shape == (1, i) and a.dtype == dtype
    assert rel_err(a, ra) < _tol(dtype)
    assert _same_sum(r, (x.float() + res.float()).to(dtype))


@pytest.mark.parametrize("dtype", ELEM_DTYPES)
@pytest.mark.parametrize("n,k", [(48, 64), (200, 96)] if not ON_GPU else [(4096, 14336), (128256, 4096), (1536, 256)])
def test_gemv(dtype, n, k):
    g = gen(n * k)
    x = randn(1, k, g=g, dtype=dtype)
    w = randn(n, k, g=g, dtype=dtype, scale=k**-0.5)
    ref = x.double() @ w.double().t()
    y = G.gemv(x, w)
    assert y.shape == (1, n) and y.dtype == dtype
    assert rel_err(y, ref) < _tol(dtype)
    y32 = G.gemv(x, w, out_dtype=torch.float32)
    assert y32.dtype == torch.float32 and rel_err(y32, ref) < _tol(dtype)
    if k % 16 == 0:  # the K-loop program shape
        y_loop = G.gemv(x, w, out_dtype=torch.float32, config=G.Config(4, 16))
        assert rel_err(y_loop, ref) < _tol(dtype)


@pytest.mark.parametrize("cfg", [G.Config(1, 16), G.Config(2, 32), G.Config(8, 16),  # K-loop
                                 G.Config(1, 0, 4, 1, 1), G.Config(4, 0, 4, 1, 2), G.Config(8, 0, 2, 1, 3),  # full-K
                                 G.Config(2, 0, 4, 1, 3), G.Config(2, 0, 4, 1, 1, 2), G.Config(4, 0, 4, 1, 3, 2)])
def test_forced_configs(cfg):
    g = gen(3)
    hq, hkv, d, h = 4, 2, 32, 64
    x = randn(1, h, g=g)
    res = randn(1, h, g=g)
    nw = randn(h, g=g)
    w = randn((hq + 2 * hkv) * d, h, g=g, scale=0.1)
    cs = torch.randn(10, d, generator=g).to(DEV)
    pos, loc = torch.tensor([3], device=DEV), torch.tensor([1], device=DEV)
    kc = torch.zeros(2, hkv, d, device=DEV)
    vc = torch.zeros(2, hkv, d, device=DEV)
    rq, rk, rv, _ = G.norm_qkv_ref(x.double(), res.double(), nw.double(), 1e-6, w.double(), None, cs.double(), pos, hq, hkv)
    q, _ = G.norm_qkv(x, res, nw, 1e-6, w, None, cs, pos, loc, kc, vc, hq, hkv, config=cfg)
    assert rel_err(q, rq) < 1e-5 and rel_err(kc[1], rk[0]) < 1e-5 and rel_err(vc[1], rv[0]) < 1e-5
    wg = randn(2 * 48, h, g=g, scale=0.1)
    ra, _ = G.norm_gate_up_ref(x.double(), res.double(), nw.double(), 1e-6, wg.double())
    assert rel_err(G.norm_gate_up(x, res, nw, 1e-6, wg, config=cfg)[0], ra) < 1e-5
    assert rel_err(G.gemv(x, wg, config=cfg), x.double() @ wg.double().t()) < 1e-5
    few = wg[: 2 * cfg.block_r]  # fewer row blocks than programs: a second block loaded ahead has none to store
    assert rel_err(G.gemv(x, few, config=cfg), x.double() @ few.double().t()) < 1e-5


@pytest.mark.parametrize("cfg", [G.Config(2, 16), G.Config(4, 32, 4, 1),  # K-loop
                                 G.Config(2, 0, 4, 1, 2), G.Config(4, 0, 4, 1, 3, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("f16", [False, True])
def test_row_scaled_fp8(cfg, dtype, f16, monkeypatch):
    """e4m3 weights with one scale per row (an fp8 model's batch-1 route) through the three kernels in
    both program shapes: each sum scaled by its row's scale.  The K-loop tiles and fp32 activations
    sum in fp32; with T.E4M3_FP16 the full-K tiles under 16-bit activations multiply e4m3 pairs by x
    in fp16 (gemv._dot), whose rounding the fp32 products of the plain GEMV bound at 1e-3.  K = 512:
    the 4-row full-K tile is wide enough for that route (G.fp16_products), the 2-row one is not."""
    monkeypatch.setattr(T, "E4M3_FP16", f16)
    g = gen(5)
    hq, hkv, d, h = 4, 2, 32, 512
    x, res, nw = randn(1, h, g=g, dtype=dtype), randn(1, h, g=g, dtype=dtype), randn(h, g=g, dtype=dtype)
    cs = torch.randn(10, d, generator=g).to(DEV)
    pos, loc = torch.tensor([3], device=DEV), torch.tensor([1], device=DEV)
    kc, vc = torch.zeros(2, hkv, d, device=DEV, dtype=dtype), torch.zeros(2, hkv, d, device=DEV, dtype=dtype)

    def e4m3(n):
        w8 = (torch.randn(n, h, generator=g) * 3).to(DEV).to(torch.float8_e4m3fn)
        s = (torch.rand(n, generator=g) * 0.05 + 0.01).to(DEV)
        return w8, s, w8.double() * s.double()[:, None]

    fp16_x = cfg.programs_per_sm > 0 and G.fp16_products(cfg, h, torch.float8_e4m3fn, dtype)
    out_bound = 1e-5 if dtype == torch.float32 else 2**-7  # outputs in the activations' dtype
    wq, sq, rq64 = e4m3((hq + 2 * hkv) * d)
    rq, rk, rv, _ = G.norm_qkv_ref(x.double(), res.double(), nw.double(), 1e-6, rq64, None, cs.double(), pos, hq, hkv)
    q, _ = G.norm_qkv(x, res, nw, 1e-6, wq, None, cs, pos, loc, kc, vc, hq, hkv, config=cfg, scales=sq)
    assert rel_err(q, rq) < out_bound and rel_err(kc[1], rk[0]) < out_bound and rel_err(vc[1], rv[0]) < out_bound
    wg, sg, rg64 = e4m3(2 * 48)
    ra, _ = G.norm_gate_up_ref(x.double(), res.double(), nw.double(), 1e-6, rg64)
    assert rel_err(G.norm_gate_up(x, res, nw, 1e-6, wg, config=cfg, scales=sg)[0], ra) < out_bound
    for scale in (1.0, 1e-30, 1e30):  # x's power of two follows its range
        xx = x * scale
        err = rel_err(G.gemv(xx, wg, config=cfg, scales=sg, out_dtype=torch.float32), xx.double() @ rg64.t())
        assert err < (1e-3 if fp16_x else 1e-5)
        assert (err > 1e-6) == fp16_x  # the fp16 route ran where it should: fp32 sums are exact to ~1e-7


def test_fp16_products_need_16_columns(monkeypatch):
    """With T.E4M3_FP16 on, a row narrower than the fp16 route's runs of 16 keeps the fp32 sums
    (exact for bf16 x and e4m3 weights), as does a tile that gives a thread fewer than 16 columns
    (G.fp16_products); 32 rows of 16 on one warp take the fp16 route."""
    monkeypatch.setattr(T, "E4M3_FP16", True)
    g = gen(9)
    for k, rows, fp16 in ((8, 64, False), (16, 16, False), (16, 32, True)):
        cfg = G.Config(rows, 0, 1, 1, 1)
        # the launcher's say; the kernel alone refuses k = 8
        assert G.fp16_products(cfg, k, torch.float8_e4m3fn, torch.bfloat16) == (rows * k >= 512)
        assert not G.fp16_products(cfg, k, torch.bfloat16, torch.bfloat16)  # bf16 weights: fp32 products
        assert not G.fp16_products(cfg, k, torch.float8_e4m3fn, torch.float32)  # fp32 activations: fp32 products
        x = randn(1, k, g=g, dtype=torch.bfloat16)
        w = (torch.randn(rows, k, generator=g) * 3).to(DEV).to(torch.float8_e4m3fn)
        s = torch.ones(rows, device=DEV)
        y = G.gemv(x, w, config=cfg, scales=s, out_dtype=torch.float32)
        err = rel_err(y, x.double() @ w.double().t())
        assert (err > 1e-6) == fp16 and err < 1e-3, (k, err)


@pytest.mark.parametrize("kind", ["gemv", "gate_up", "qkv"])
def test_fp16_products_every_full_k_tile(kind, monkeypatch):
    """The e4m3 x fp16 route (T.E4M3_FP16) against fp64 in every full-K tile shape a config can
    ask for: 1-8 rows, 1-8 warps, K from one run of 16 to Llama's 4,096 on the GPU, so a layout
    that holds one or two columns a thread is covered as well as the tuned tiles.  Failures are
    collected and named together (shape, error).  Triton 3.6 on an H200 summed wrongly where a tile
    gave each thread exactly one column; those tiles keep the fp32 products (G.fp16_products),
    which the plain GEMV's error shows (the fp32 sums are exact to ~1e-7)."""
    monkeypatch.setattr(T, "E4M3_FP16", True)
    g = gen(11)
    hq, hkv, d = 4, 2, 32
    bad = []
    for k in (16, 64, 256) + ((4096,) if ON_GPU else ()):
        x, res, nw = randn(1, k, g=g, dtype=torch.bfloat16), randn(1, k, g=g, dtype=torch.bfloat16), randn(k, g=g)
        rows = (hq + 2 * hkv) * d if kind == "qkv" else 2 * 48
        w = (torch.randn(rows, k, generator=g) * 3).to(DEV).to(torch.float8_e4m3fn)
        s = (torch.rand(rows, generator=g) * 0.05 + 0.01).to(DEV)
        w64 = w.double() * s.double()[:, None]
        for r in (1, 2, 4, 8):
            for warps in (1, 2, 4, 8) if ON_GPU else (4,):
                cfg = G.Config(r, 0, warps, 1, 2)
                if kind == "gemv":
                    err, bound = rel_err(G.gemv(x, w, config=cfg, scales=s, out_dtype=torch.float32),
                                         x.double() @ w64.t()), 1e-3
                elif kind == "gate_up":
                    ref, _ = G.norm_gate_up_ref(x.double(), res.double(), nw.double(), 1e-6, w64)
                    err, bound = rel_err(G.norm_gate_up(x, res, nw, 1e-6, w, config=cfg, scales=s)[0], ref), 2**-7
                else:
                    cs = torch.randn(10, d, generator=g).to(DEV)
                    pos, loc = torch.tensor([3], device=DEV), torch.tensor([1], device=DEV)
                    kc, vc = (torch.zeros(2, hkv, d, device=DEV, dtype=torch.bfloat16) for _ in range(2))
                    rq, rk, rv, _ = G.norm_qkv_ref(x.double(), res.double(), nw.double(), 1e-6, w64, None,
                                                   cs.double(), pos, hq, hkv)
                    q, _ = G.norm_qkv(x, res, nw, 1e-6, w, None, cs, pos, loc, kc, vc, hq, hkv, config=cfg, scales=s)
                    err, bound = max(rel_err(q, rq), rel_err(kc[1], rk[0]), rel_err(vc[1], rv[0])), 2**-7
                if kind == "gemv" and (err > 1e-6) != G.fp16_products(cfg, k, w.dtype, x.dtype):
                    bad.append((f"K={k} rows={r} warps={warps}", f"route: {err:.3g}"))
                if not err < bound:
                    bad.append((f"K={k} rows={r} warps={warps}", f"{err:.3g}"))
    assert not bad, bad


def test_support_checks():
    dev = "cuda" if ON_GPU else "cpu"
    assert not G.norm_qkv_supported(32, 8, 128, 4096, 64, dev)  # partial rotary
    assert G.norm_qkv_supported(32, 8, 128, 4096, 128, dev)
    assert G.gemv_supported(4096, 4095, dev)  # full-K: any K up to FULLK_MAX, masked
    assert not G.gemv_supported(4096, 16383 + 16384, dev)  # K-loop: K must split into column blocks
    assert G.gemv_supported(128256, 4096, dev) and G.gemv_supported(128256, 4096, dev, "lm_head")
    assert G.default_config(8, 4096, dev, "gate_up").programs_per_sm > 0
    assert G.default_config(8, 14336, dev).programs_per_sm == 0
    assert G.default_config(8, 4096, dev, "lm_head").programs_per_sm > 0


def test_one_byte_weights_take_their_own_cuda_tiles():
    """fp8 (one byte a weight) streams take the one-byte tile table, at least as many rows a
    tile as bf16's; a wide tile that does not divide the row blocks falls back to fewer rows,
    and a long K takes the one-byte K-loop tile."""
    for kind in ("qkv", "gate_up", "gemv", "lm_head"):
        bf16, fp8 = G.default_config(64, 4096, "cuda", kind), G.default_config(64, 4096, "cuda", kind, elem=1)
        assert fp8.programs_per_sm and fp8.block_r >= bf16.block_r
        assert (fp8.block_r, fp8.programs_per_sm, fp8.num_warps) == T._CUDA_FULLK_1B[kind][:3]
    assert G.default_config(4, 4096, "cuda", "gemv", elem=1).block_r == 4
    assert G.default_config(12, 4096, "cuda", "gemv", elem=1).block_r == 4  # 8 rows do not divide 12
    down = G.default_config(4096, 14336, "cuda", "gemv", elem=1)
    assert down.programs_per_sm == 0 and (down.block_r, down.block_k, down.num_warps) == T._CUDA_TILES_1B["gemv"][:3]
    assert G.default_config(12, 4096, "cuda", "gemv").block_r == 4  # two-byte tiles unchanged


@pytest.mark.parametrize("cfg", [(4, 0, 4, 1, 1), (4, 0, 8, 1, 2)])
def test_full_k_one_byte_gemv_over_a_wide_k(cfg):
    """A full-K tile over K = 14336 of e4m3 weights (padded to 16384, masked; scripts/probe_fp8_parts.py times
    these for down_proj) against the torch product."""
    g = torch.Generator().manual_seed(3)
    K = 14336
    x = torch.randn(1, K, generator=g).to(DEV, torch.bfloat16)
    w = torch.randn(16, K, generator=g).to(torch.float8_e4m3fn).to(DEV)
    s = (torch.rand(16, generator=g) * 0.02 + 0.01).to(DEV)
    y = G.gemv(x, w, config=G.Config(*cfg), scales=s)
    ref = (x.double() @ w.double().t()) * s.double()
    torch.testing.assert_close(y.double(), ref, rtol=1e-2, atol=2e-2)


def test_pdl_is_off_on_cpu_or_when_disabled():
    """PDL launch options are never passed on the CPU or under the interpreter (the kernels'
    ``PDL`` constexpr is False there), and the switch turns them off on any device."""
    from localsgl_kernels import pdl

    assert pdl.launch_options(torch.device("cpu")) == {"PDL": False}
    pdl.set_enabled(False)
    try:
        assert pdl.launch_options(torch.device("cuda", 0)) == {"PDL": False}
    finally:
        pdl.set_enabled(True)


def test_pdl_support_rule():
    """PDL only with sm90+, a driver that captures it into graphs (CUDA 12.3+) and a Triton
    with the launch option."""
    from localsgl_kernels import pdl

    assert pdl.supported(9, 12030, True) and pdl.supported(12, 13000, True)
    assert not pdl.supported(8, 13000, True)  # Ampere / Ada: no griddepcontrol
    assert not pdl.supported(9, 12020, True)  # driver too old for PDL in graphs
    assert not pdl.supported(9, 0, True)  # driver version unreadable
    assert not pdl.supported(9, 13000, False)  # Triton without launch_pdl
