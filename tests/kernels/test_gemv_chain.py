"""o_proj + norm_gate_up in one launch (kernels/gemv_chain.py) against fp64 torch references:
bf16/fp16/fp32 and e4m3 weights with row scales, the two-launch route (the interpreter's, and the
GPU's where the programs would not all be resident) and the one-launch route with its grid barrier
(one program under the interpreter; every program on the GPU, launched over and over on one
counter)."""
import pytest
import torch
from kutil import DEV, ELEM_DTYPES, ON_GPU, gen, randn, rel_err, tol

from localsgl_kernels import gemv as G
from localsgl_kernels import gemv_chain as C
from localsgl_kernels import gemv_tiles as T

SHAPES = [(64, 32, 96), (32, 64, 40)] if not ON_GPU else [(4096, 4096, 14336), (1536, 1536, 8960)]


def _inputs(g, ko, h, i, dtype):
    a = randn(1, ko, g=g, dtype=dtype)
    res = randn(1, h, g=g, dtype=dtype)
    nw = (1 + 0.1 * randn(h, g=g)).to(dtype)
    return a, res, nw


def _e4m3(g, n, k):
    w8 = (torch.randn(n, k, generator=g) * 3).to(DEV).to(torch.float8_e4m3fn)
    s = (torch.rand(n, generator=g) * 0.05 + 0.01).to(DEV)
    return w8, s, w8.double() * s.double()[:, None]


@pytest.mark.parametrize("dtype", ELEM_DTYPES)
@pytest.mark.parametrize("ko,h,i", SHAPES)
def test_o_norm_gate_up(dtype, ko, h, i):
    if (ko, h) == (64, 32):
        h = ko  # o_proj's rows are the hidden size
    g = gen(ko + h + i)
    a, res, nw = _inputs(g, ko, h, i, dtype)
    wo = randn(h, ko, g=g, dtype=dtype, scale=ko**-0.5)
    w = randn(2 * i, h, g=g, dtype=dtype, scale=h**-0.5)
    ra, rr = C.o_norm_gate_up_ref(a.double(), wo.double(), res.double(), nw.double(), 1e-6, w.double())
    out, r = C.o_norm_gate_up(a, wo, res, nw, 1e-6, w, C.new_barrier(DEV))
    assert out.shape == (1, i) and out.dtype == dtype and r.shape == (1, h)
    assert rel_err(out, ra) < 2 * tol(dtype) and rel_err(r, rr) < 2 * tol(dtype)
    # the same as the two kernels it replaces, h rounded to the activations' dtype in between
    h_sep = G.gemv(a, wo)
    a_sep, r_sep = G.norm_gate_up(h_sep, res, nw, 1e-6, w)
    assert rel_err(out, a_sep) < 2 * tol(dtype) and rel_err(r, r_sep) < 2 * tol(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("f16", [False, True])
def test_row_scaled_fp8(dtype, f16, monkeypatch):
    """e4m3 weights with one scale per row (an fp8 model's route): both streams scale their sums by
    their rows' scales; under 16-bit activations and T.E4M3_FP16 they multiply in fp16 (gemv._dot)."""
    monkeypatch.setattr(T, "E4M3_FP16", f16)
    g = gen(7)
    ko = h = 512 if not ON_GPU else 4096
    i = 96 if not ON_GPU else 14336
    a, res, nw = _inputs(g, ko, h, i, dtype)
    wo, so, wo64 = _e4m3(g, h, ko)
    w, s, w64 = _e4m3(g, 2 * i, h)
    ra, _ = C.o_norm_gate_up_ref(a.double(), wo64, res.double(), nw.double(), 1e-6, w64)
    out, _ = C.o_norm_gate_up(a, wo, res, nw, 1e-6, w, C.new_barrier(DEV), scales_o=so, scales=s)
    bound = 1e-5 if dtype == torch.float32 else 2**-7
    assert rel_err(out, ra) < bound
    f16_route = C._f16(C.config("o_gate_up", (h, ko), i, h, DEV, 1), 4, h, w, dtype, True)
    assert f16_route == (f16 and dtype == torch.bfloat16)


def test_fp32_h_and_its_residual():
    """h handed over in fp32 (an o_proj whose sums stay fp32): the residual takes its own dtype."""
    g = gen(11)
    a, res, nw = _inputs(g, 64, 64, 48, torch.bfloat16)
    wo = randn(64, 64, g=g, dtype=torch.bfloat16, scale=0.125)
    w = randn(96, 64, g=g, dtype=torch.bfloat16, scale=0.125)
    ra, rr = C.o_norm_gate_up_ref(a.double(), wo.double(), res.double(), nw.double(), 1e-6, w.double(),
                                  h_dtype=torch.float64)
    out, r = C.o_norm_gate_up(a, wo, res, nw, 1e-6, w, C.new_barrier(DEV), h_dtype=torch.float32)
    assert r.dtype == torch.bfloat16 and out.dtype == torch.bfloat16
    assert rel_err(out, ra) < 2 * tol(torch.bfloat16) and rel_err(r, rr) < 2 * tol(torch.bfloat16)


@pytest.mark.skipif(ON_GPU, reason="the GPU launches every program at once (test_barrier_on_the_gpu)")
def test_one_launch_with_one_program():
    """PHASES 3 (o_proj, the barrier, gate_up) with one program: the barrier passes on the program's own
    arrival, and the counter advances by one a launch."""
    g = gen(13)
    a, res, nw = _inputs(g, 32, 32, 24, torch.float32)
    wo = randn(32, 32, g=g, scale=0.2)
    w = randn(48, 32, g=g, scale=0.2)
    bar = C.new_barrier(DEV)
    ra, rr = C.o_norm_gate_up_ref(a.double(), wo.double(), res.double(), nw.double(), 1e-6, w.double())
    for n in range(1, 4):
        hb, r_out, out = torch.empty(32), torch.empty(32), torch.empty(1, 24)
        C._o_norm_gate_up_kernel[(1,)](a.view(32), wo, hb, res.view(32), nw, r_out, w, out, bar, 32, 32, 24, 8, 6,
                                       1e-6, 32, 32, BLOCK_RO=4, BLOCK_R=4, KO_PAD=32, K_PAD=32, PHASES=3, PDL=False)
        assert int(bar) == n
        assert rel_err(out, ra) < 1e-5 and rel_err(r_out, rr) < 1e-5


QKV_SHAPES = [(4, 2, 32, 64, 96), (6, 2, 16, 96, 48)] if not ON_GPU else [(32, 8, 128, 4096, 14336), (12, 2, 64, 1536, 8960)]


def _qkv_inputs(g, hq, hkv, d, h, dtype):
    cs = torch.randn(10, d, generator=g).to(DEV)
    pos, loc = torch.tensor([3], device=DEV), torch.tensor([1], device=DEV)
    kc = torch.zeros(3, hkv, d, device=DEV, dtype=dtype)
    vc = torch.zeros(3, hkv, d, device=DEV, dtype=dtype)
    return cs, pos, loc, kc, vc


def _down_qkv_ref(x, wd, res, nw, wq, bias, cs, pos, hq, hkv, h_dtype):
    h = (x.double() @ wd.double().t()).to(h_dtype)
    return G.norm_qkv_ref(h.double(), res.double(), nw.double(), 1e-6, wq.double(),
                          None if bias is None else bias.double(), cs.double(), pos, hq, hkv)


@pytest.mark.parametrize("dtype", ELEM_DTYPES)
@pytest.mark.parametrize("hq,hkv,d,h,i", QKV_SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_down_norm_qkv(dtype, hq, hkv, d, h, i, bias):
    """down_proj then the next layer's norm_qkv: q, k and v at their slot (the others untouched), and r."""
    g = gen(h + i + d)
    x = randn(1, i, g=g, dtype=dtype)
    res = randn(1, h, g=g, dtype=dtype)
    nw = (1 + 0.1 * randn(h, g=g)).to(dtype)
    wd = randn(h, i, g=g, dtype=dtype, scale=i**-0.5)
    wq = randn((hq + 2 * hkv) * d, h, g=g, dtype=dtype, scale=h**-0.5)
    b = randn((hq + 2 * hkv) * d, g=g, dtype=dtype) if bias else None
    cs, pos, loc, kc, vc = _qkv_inputs(g, hq, hkv, d, h, dtype)
    rq, rk, rv, rr = _down_qkv_ref(x, wd, res, nw, wq, b, cs, pos, hq, hkv, dtype)
    q, r = C.down_norm_qkv(x, wd, res, nw, 1e-6, wq, b, cs, pos, loc, kc, vc, hq, hkv, C.new_barrier(DEV))
    assert q.shape == (1, hq, d) and q.dtype == dtype and r.shape == (1, h)
    t = 2 * tol(dtype)
    assert rel_err(q, rq) < t and rel_err(kc[1], rk[0]) < t and rel_err(vc[1], rv[0]) < t and rel_err(r, rr) < t
    assert not kc[0].any() and not kc[2].any() and not vc[0].any() and not vc[2].any()
    # the same as the two kernels it replaces
    kc2, vc2 = torch.zeros_like(kc), torch.zeros_like(vc)
    q2, r2 = G.norm_qkv(G.gemv(x, wd), res, nw, 1e-6, wq, b, cs, pos, loc, kc2, vc2, hq, hkv)
    assert rel_err(q, q2) < t and rel_err(kc, kc2) < t and rel_err(r, r2) < t


@pytest.mark.parametrize("f16", [False, True])
def test_down_norm_qkv_row_scaled_fp8(f16, monkeypatch):
    monkeypatch.setattr(T, "E4M3_FP16", f16)
    g = gen(19)
    hq, hkv, d, h, i = (4, 2, 32, 512, 128) if not ON_GPU else (32, 8, 128, 4096, 14336)
    x = randn(1, i, g=g, dtype=torch.bfloat16)
    res = randn(1, h, g=g, dtype=torch.bfloat16)
    nw = (1 + 0.1 * randn(h, g=g)).to(torch.bfloat16)
    wd, sd, wd64 = _e4m3(g, h, i)
    wq, sq, wq64 = _e4m3(g, (hq + 2 * hkv) * d, h)
    cs, pos, loc, kc, vc = _qkv_inputs(g, hq, hkv, d, h, torch.bfloat16)
    rq, rk, rv, _ = _down_qkv_ref(x, wd64, res, nw, wq64, None, cs, pos, hq, hkv, torch.bfloat16)
    q, _ = C.down_norm_qkv(x, wd, res, nw, 1e-6, wq, None, cs, pos, loc, kc, vc, hq, hkv, C.new_barrier(DEV),
                           scales_d=sd, scales=sq)
    assert rel_err(q, rq) < 2**-7 and rel_err(kc[1], rk[0]) < 2**-7 and rel_err(vc[1], rv[0]) < 2**-7


@pytest.mark.skipif(ON_GPU, reason="the GPU launches every program at once (test_barrier_on_the_gpu)")
def test_down_qkv_one_launch_with_one_program():
    g = gen(23)
    hq, hkv, d, h, i = 2, 1, 16, 32, 48
    x, res = randn(1, i, g=g), randn(1, h, g=g)
    nw = 1 + 0.1 * randn(h, g=g)
    wd, wq = randn(h, i, g=g, scale=0.2), randn((hq + 2 * hkv) * d, h, g=g, scale=0.2)
    cs, pos, loc, kc, vc = _qkv_inputs(g, hq, hkv, d, h, torch.float32)
    rq, rk, rv, rr = _down_qkv_ref(x, wd, res, nw, wq, None, cs, pos, hq, hkv, torch.float32)
    bar = C.new_barrier(DEV)
    hb, r_out, q = torch.empty(h), torch.empty(h), torch.empty(1, hq, d)
    C._down_norm_qkv_kernel[(1,)](x.view(i), wd, hb, res.view(h), nw, r_out, wq, wq, cs, pos, loc, q, kc, vc, bar,
                                  i, h, h // 4, (hq + 2 * hkv) * d // 4, 1e-6, i, h, cs.stride(0), kc.stride(0), kc.stride(1), vc.stride(0),
                                  vc.stride(1), HQ=hq, HKV=hkv, D=d, HAS_BIAS=False, BLOCK_RD=4, BLOCK_KD=16,
                                  BLOCK_R=2, K_PAD=h, PHASES=3, PDL=False)
    assert int(bar) == 1
    assert rel_err(q, rq) < 1e-5 and rel_err(kc[1], rk[0]) < 1e-5 and rel_err(vc[1], rv[0]) < 1e-5
    assert rel_err(r_out, rr) < 1e-5


def test_config_declines_what_it_does_not_take():
    assert C.config("o_gate_up", (4096, 4096), 14336, 4096, "cuda", 1) == C._O_GATE_UP[1]
    assert C.config("down_qkv", (4096, 14336), 64, 4096, "cuda", 1) == C._DOWN_QKV[1]
    assert C.config("o_gate_up", (4096, 4096), 14336, 4096, "cuda", 4) is None  # no fp32-weight tile
    assert C.config("o_gate_up", (4096, 16384), 14336, 4096, "cuda", 1) is None  # o_proj's K past the full-K tiles
    assert C.config("o_gate_up", (2048, 4096), 14336, 4096, "cuda", 1) is None  # o_proj's rows: not the hidden size
    assert C.config("o_gate_up", (4096, 4096), 14338, 4096, "cuda", 1) is None  # gate_up rows that do not tile
    assert C.config("down_qkv", (4096, 14000), 64, 4096, "cuda", 1) is None  # down_proj's K: no whole K steps


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
def test_barrier_on_the_gpu():
    """Every program resident, the grid barrier between the streams: 50 launches on one counter agree
    with the two-launch route bit for bit, and the counter advances by the grid each launch (one
    arrival a program, not one a thread)."""
    g = gen(17)
    ko = h = 4096
    i = 14336
    a, res, nw = _inputs(g, ko, h, i, torch.bfloat16)
    wo, so, _ = _e4m3(g, h, ko)
    w, s, _ = _e4m3(g, 2 * i, h)
    cfg = C.config("o_gate_up", (h, ko), i, h, "cuda", 1)
    bar = C.new_barrier(DEV)
    C._GRIDS.clear()
    ref = None
    for _ in range(50):
        out, r = C.o_norm_gate_up(a, wo, res, nw, 1e-6, w, bar, scales_o=so, scales=s)
        ref = out if ref is None else ref
        assert torch.equal(out, ref)
    grid = next(iter(C._GRIDS.values()))
    assert 0 < grid <= min(cfg.programs_per_sm * C._sms(torch.device(DEV)), i // cfg.block_b)  # fewer a SM: occupancy
    assert int(bar) == 50 * grid
    two = C._GRIDS.copy()
    for key in C._GRIDS:
        C._GRIDS[key] = 0  # the two-launch route
    out2, r2 = C.o_norm_gate_up(a, wo, res, nw, 1e-6, w, bar, scales_o=so, scales=s)
    C._GRIDS.update(two)
    assert torch.equal(out2, ref) and torch.equal(r2, r)
    assert int(bar) == 50 * grid


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
def test_down_qkv_barrier_on_the_gpu():
    """down_proj -> qkv with every program resident: 50 launches on one counter write the same q, k and
    v as the two-launch route, and the counter advances by the grid each launch."""
    g = gen(29)
    hq, hkv, d, h, i = 32, 8, 128, 4096, 14336
    x = randn(1, i, g=g, dtype=torch.bfloat16)
    res = randn(1, h, g=g, dtype=torch.bfloat16)
    nw = (1 + 0.1 * randn(h, g=g)).to(torch.bfloat16)
    wd, sd, _ = _e4m3(g, h, i)
    wq, sq, _ = _e4m3(g, (hq + 2 * hkv) * d, h)
    cs, pos, loc, kc, vc = _qkv_inputs(g, hq, hkv, d, h, torch.bfloat16)
    bar = C.new_barrier(DEV)
    C._GRIDS.clear()
    ref = None
    for _ in range(50):
        q, r = C.down_norm_qkv(x, wd, res, nw, 1e-6, wq, None, cs, pos, loc, kc, vc, hq, hkv, bar, scales_d=sd,
                               scales=sq)
        ref = (q, kc.clone(), vc.clone()) if ref is None else ref
        assert torch.equal(q, ref[0]) and torch.equal(kc, ref[1]) and torch.equal(vc, ref[2])
    grid = next(iter(C._GRIDS.values()))
    assert grid > 0 and int(bar) == 50 * grid
    for key in C._GRIDS:
        C._GRIDS[key] = 0  # the two-launch route
    kc.zero_()
    q2, r2 = C.down_norm_qkv(x, wd, res, nw, 1e-6, wq, None, cs, pos, loc, kc, vc, hq, hkv, bar, scales_d=sd,
                             scales=sq)
    C._GRIDS.clear()
    assert torch.equal(q2, ref[0]) and torch.equal(kc, ref[1]) and torch.equal(r2, r)
    assert int(bar) == 50 * grid


_CONCURRENT = """
import torch
from localsgl_kernels import gemv_chain as C
torch.manual_seed(0)
h, i = 4096, 14336
streams = [torch.cuda.Stream() for _ in range(3)]
jobs = []
for s in streams:
    a = torch.randn(1, h, device="cuda", dtype=torch.bfloat16)
    res = torch.randn(1, h, device="cuda", dtype=torch.bfloat16)
    nw = torch.ones(h, device="cuda", dtype=torch.bfloat16)
    wo = torch.randn(h, h, device="cuda").to(torch.float8_e4m3fn)
    w = torch.randn(2 * i, h, device="cuda").to(torch.float8_e4m3fn)
    so, sg = torch.full((h,), 0.01, device="cuda"), torch.full((2 * i,), 0.01, device="cuda")
    jobs.append((s, (a, wo, res, nw, 1e-6, w, C.new_barrier("cuda")), dict(scales_o=so, scales=sg)))
outs = [C.o_norm_gate_up(*args, **kw)[0] for _, args, kw in jobs]
torch.cuda.synchronize()
for _ in range(200):
    for s, args, kw in jobs:
        with torch.cuda.stream(s):
            C.o_norm_gate_up(*args, **kw)
torch.cuda.synchronize()
print("done", C.COOPERATIVE, sorted(set(C._GRIDS.values())))
"""


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
def test_concurrent_chains_do_not_deadlock():
    """Three streams launching full-grid chains at once (two engines' steps on one GPU): every launch
    finishes (a subprocess, so a deadlock fails the test instead of hanging it)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _CONCURRENT], capture_output=True, text=True, timeout=240, env=env)
    assert out.returncode == 0 and "done" in out.stdout, out.stderr[-2000:]
