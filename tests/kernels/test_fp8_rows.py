"""The fp8 row quantization of _scaled_mm's activations (kernels/fp8_rows.py) against its torch
reference: the same e4m3 bytes and scales, under the interpreter on the CPU and on the GPU."""
from __future__ import annotations

import pytest
import torch
from kutil import DEV

from localsgl_kernels.fp8_rows import quantize_rows, quantize_rows_ref


@pytest.mark.parametrize("m,k,dtype", [(3, 4096, torch.bfloat16), (5, 3000, torch.float16), (2, 14336, torch.bfloat16),
                                       (4, 256, torch.float32)])
def test_rows_match_reference(m, k, dtype):
    g = torch.Generator().manual_seed(m * k)
    x = (torch.randn(m, k, generator=g) * torch.logspace(-3, 3, m)[:, None]).to(dtype)
    x[0, 7] = 0.0
    if m > 2:
        x[2] = 0.0  # an all-zero row: scale clamped, bytes zero
    x = x.to(DEV)
    q, s = quantize_rows(x)
    qr, sr = quantize_rows_ref(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape and s.shape == (m, 1)
    assert torch.equal(s, sr)
    assert torch.equal(q.view(torch.uint8), qr.view(torch.uint8))
    # and it is a quantization of x: within half an e4m3 step (2^-4 relative) of each value
    err = (q.float() * s - x.float()).abs()
    assert (err <= x.float().abs() * 2.0**-4 + s * 2.0**-9).all()


def test_rows_of_a_strided_view():
    x = torch.randn(4, 512, dtype=torch.bfloat16, device=DEV)
    wide = torch.zeros(4, 1024, dtype=torch.bfloat16, device=DEV)
    wide[:, :512] = x
    q, s = quantize_rows(wide[:, :512])
    qr, sr = quantize_rows_ref(x)
    assert torch.equal(q.view(torch.uint8), qr.view(torch.uint8)) and torch.equal(s, sr)
