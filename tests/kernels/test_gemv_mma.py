"""kernels/gemv_mma.py (one-row GEMVs over e4m3 weights on the tensor cores) against fp64
references over the same e4m3 values and row scales: the plain GEMV (split or not) and the fused
rmsnorm + gate/up + SiLU·mul; activations far from 1 (large and tiny) keep their precision."""
import pytest
import torch
from kutil import DEV, ON_GPU, gen, randn, rel_err

from localsgl_kernels import gemv as G
from localsgl_kernels import gemv_mma as M

TOL = 2e-3  # x rounded to fp16 (11 bits) after the 1/256 pre-scale; the GEMV in fp32 over fp64 sums


def _e4m3(n, k, g):
    w8 = (torch.randn(n, k, generator=g) * 3).to(torch.float8_e4m3fn).to(DEV)
    s = (torch.rand(n, generator=g) * 0.05 + 0.01).to(DEV)
    return w8, s, w8.double() * s.double()[:, None]


@pytest.mark.parametrize("cfg", [M.Config(16, 32), M.Config(32, 64, 4, 2), M.Config(16, 32, 4, 3, 2),
                                 M.Config(16, 16, 4, 1, 4)])
@pytest.mark.parametrize("xscale", [1.0, 3000.0, 1e-3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gemv(cfg, xscale, dtype):
    g = gen(31)
    w8, s, ref_w = _e4m3(64, 128, g)
    x = randn(1, 128, g=g, dtype=dtype, scale=xscale)
    y = M.gemv(x, w8, s, cfg)
    assert y.dtype == dtype and y.shape == (1, 64)
    assert rel_err(y, x.double() @ ref_w.t()) < (8e-3 if dtype == torch.bfloat16 else TOL)  # + the output's rounding
    assert rel_err(M.gemv(x, w8, s, cfg, out_dtype=torch.float32), x.double() @ ref_w.t()) < TOL


@pytest.mark.parametrize("cfg", [M.Config(16, 32), M.Config(32, 64, 4, 2)])
def test_norm_gate_up(cfg):
    g = gen(32)
    h, i = 128, 64
    x, res, nw = randn(1, h, g=g, dtype=torch.bfloat16), randn(1, h, g=g, dtype=torch.bfloat16), randn(h, g=g)
    w8, s, ref_w = _e4m3(2 * i, h, g)
    ref, r_ref = G.norm_gate_up_ref(x.double(), res.double(), nw.double(), 1e-6, ref_w)
    out, r = M.norm_gate_up(x, res, nw, 1e-6, w8, s, cfg)
    assert rel_err(out, ref) < 8e-3  # bf16 output
    r_ref = (x.float() + res.float()).to(torch.bfloat16)
    # exact on the GPU; the interpreter rounds fp32 -> bf16 by truncation: one ulp there
    assert torch.equal(r, r_ref) if ON_GPU else torch.allclose(r.float(), r_ref.float(), rtol=2**-7, atol=0)


def test_applies():
    w8 = torch.zeros(64, 128, device=DEV).to(torch.float8_e4m3fn)
    s = torch.ones(64, device=DEV)
    assert M.applies(w8, s, M.Config(16, 32)) and M.applies(w8, s, M.Config(64, 64, split_k=2))
    assert not M.applies(w8, None, M.Config(16, 32))  # row scales needed
    assert not M.applies(w8, s, M.Config(128, 32))  # rows per tile
    assert not M.applies(w8, s, M.Config(16, 64, split_k=4))  # 128 columns in 4 slices of 64: no
    assert not M.applies(w8.to(torch.bfloat16), s, M.Config(16, 32))
