"""silu_and_mul vs fp64 torch on odd widths, several leading shapes and a strided input."""
import pytest
import torch
from kutil import ELEM_DTYPES, gen, randn, rel_err, tol

from localsgl_kernels.activation import silu_and_mul


def ref(x):
    xd = x.double()
    i = x.shape[-1] // 2
    return torch.nn.functional.silu(xd[..., :i]) * xd[..., i:]


@pytest.mark.parametrize("dtype", ELEM_DTYPES)
@pytest.mark.parametrize("shape", [(37, 2 * 173), (1, 2 * 3000), (3, 5, 2 * 64)])
def test_silu_and_mul(dtype, shape):
    x = randn(*shape, g=gen(sum(shape)), dtype=dtype, scale=4.0)
    out = silu_and_mul(x)
    assert out.shape == (*shape[:-1], shape[-1] // 2) and out.dtype == dtype
    assert rel_err(out, ref(x)) < tol(dtype)


def test_strided_rows():
    big = randn(37, 500, g=gen(5), dtype=torch.float16)
    x = big[:, :400]
    assert rel_err(silu_and_mul(x), ref(x)) < tol(torch.float16)


def test_empty():
    x = randn(0, 64, g=gen(0))
    assert silu_and_mul(x).shape == (0, 32)
