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
    f16_route = C._f16(C.config(h, ko, i, h, DEV, 1), 4, h, w, dtype, True)
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


def test_config_declines_what_it_does_not_take():
    assert C.config(4096, 4096, 14336, 4096, "cuda", 1) == C._CUDA[1]
    assert C.config(4096, 4096, 14336, 4096, "cuda", 4) is None  # no fp32-weight tile
    assert C.config(4096, 16384, 14336, 4096, "cuda", 1) is None  # o_proj's K past the full-K tiles
    assert C.config(2048, 4096, 14336, 4096, "cuda", 1) is None  # o_proj's rows are not the hidden size
    assert C.config(4096, 4096, 14338, 4096, "cuda", 1) is None  # gate_up rows that do not tile


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
    cfg = C.config(h, ko, i, h, "cuda", 1)
    bar = C.new_barrier(DEV)
    C._GRIDS.clear()
    ref = None
    for _ in range(50):
        out, r = C.o_norm_gate_up(a, wo, res, nw, 1e-6, w, bar, scales_o=so, scales=s)
        ref = out if ref is None else ref
        assert torch.equal(out, ref)
    grid = next(iter(C._GRIDS.values()))
    assert grid == min(cfg.programs_per_sm * C._sms(torch.device(DEV)), i // cfg.block_r)
    assert int(bar) == 50 * grid
    two = C._GRIDS.copy()
    for key in C._GRIDS:
        C._GRIDS[key] = 0  # the two-launch route
    out2, r2 = C.o_norm_gate_up(a, wo, res, nw, 1e-6, w, bar, scales_o=so, scales=s)
    C._GRIDS.update(two)
    assert torch.equal(out2, ref) and torch.equal(r2, r)
    assert int(bar) == 50 * grid
