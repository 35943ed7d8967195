"""rmsnorm / fused_add_rmsnorm vs an fp64 torch reference: 2-D rows of odd widths, 3-D
[T, heads, D] (Qwen3 q/k norm), strided input, the residual written in place, and a width
above the register-resident limit (two-pass path)."""
import pytest
import torch
from kutil import DEV, ELEM_DTYPES, ON_GPU, gen, randn, rel_err, tol

from localsgl_kernels import rmsnorm as K


def ref_norm(x, w, eps):
    xd = x.double()
    return xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps) * w.double()


@pytest.mark.parametrize("dtype", ELEM_DTYPES)
@pytest.mark.parametrize("T,H", [(37, 96), (5, 1000), (1, 4096)])
def test_rmsnorm(dtype, T, H):
    g = gen(T * H)
    x = randn(T, H, g=g, dtype=dtype, scale=3.0)
    w = randn(H, g=g, dtype=dtype)
    out = K.rmsnorm(x, w, 1e-6)
    assert out.shape == x.shape and out.dtype == dtype
    assert rel_err(out, ref_norm(x, w, 1e-6)) < tol(dtype)


@pytest.mark.parametrize("dtype", ELEM_DTYPES)
def test_rmsnorm_3d_and_strided(dtype):
    g = gen(1)
    x = randn(37, 6, 64, g=g, dtype=dtype)  # Qwen3 q-norm: normalise each head vector
    w = randn(64, g=g, dtype=dtype)
    out = K.rmsnorm(x, w, 1e-5)
    assert out.shape == (37, 6, 64)
    assert rel_err(out, ref_norm(x, w, 1e-5)) < tol(dtype)
    big = randn(37, 300, g=g, dtype=dtype)
    xs = big[:, 10:138]  # row stride 300
    assert rel_err(K.rmsnorm(xs, w.repeat(2), 1e-5), ref_norm(xs, w.repeat(2), 1e-5)) < tol(dtype)


@pytest.mark.parametrize("dtype", ELEM_DTYPES)
@pytest.mark.parametrize("T,H", [(37, 200), (3, 2048)])
def test_fused_add_rmsnorm(dtype, T, H):
    g = gen(T + H)
    x = randn(T, H, g=g, dtype=dtype)
    r = randn(T, H, g=g, dtype=dtype)
    w = randn(H, g=g, dtype=dtype)
    x0, r0 = x.clone(), r.clone()
    s_ref = (x0 + r0)  # rounded to dtype, as the torch path does
    y, new_r = K.fused_add_rmsnorm(x, r, w, 1e-6)
    if ON_GPU or dtype != torch.bfloat16:
        assert torch.equal(new_r, s_ref)
    else:  # the interpreter rounds fp32 -> bf16 by truncation: allow one ulp
        assert torch.allclose(new_r.float(), s_ref.float(), rtol=2**-7, atol=0)
    assert new_r.data_ptr() == r.data_ptr()  # residual updated in place
    assert torch.equal(x, x0)  # x untouched
    assert rel_err(y, ref_norm(s_ref, w, 1e-6)) < tol(dtype)


def test_wide_rows_two_pass():
    g = gen(7)
    H = K.MAX_FUSED_H + 3000
    x = randn(2, H, g=g, dtype=torch.float32)
    r = randn(2, H, g=g, dtype=torch.float32)
    w = randn(H, g=g, dtype=torch.float32)
    assert rel_err(K.rmsnorm(x, w, 1e-6), ref_norm(x, w, 1e-6)) < 1e-5
    s = x + r
    y, nr = K.fused_add_rmsnorm(x, r.clone(), w, 1e-6)
    assert torch.allclose(nr, s)
    assert rel_err(y, ref_norm(s, w, 1e-6)) < 1e-5


def test_matches_layer_reference():
    """Same numbers as the layer's torch path, within one bf16 rounding."""
    from localsgl.engine.layers.norm import rms_norm_ref

    g = gen(3)
    x = randn(37, 128, g=g, dtype=torch.bfloat16)
    w = randn(128, g=g, dtype=torch.bfloat16)
    a = K.rmsnorm(x, w, 1e-6).float()
    b = rms_norm_ref(x, w, 1e-6).float()
    assert torch.allclose(a, b, rtol=2e-2, atol=2e-2)
    assert DEV in str(a.device)
