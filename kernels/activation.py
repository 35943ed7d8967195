"""SiLU-and-mul, the gated MLP's activation.

Math: x = [g | u] with g, u of width I;  out = silu(g) * u = g * sigmoid(g) * u,
computed in fp32 and rounded once to x's dtype.

Floor: streaming.  Reads 2·T·I·elem bytes, writes T·I·elem: 3·T·I·elem bytes over copy
bandwidth (FLOPs ~5 per output element are negligible).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .options import FMA


@triton.jit
def _silu_and_mul_kernel(X, Y, I, stride_x, stride_y, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    g = tl.load(X + t * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(X + t * stride_x + I + cols, mask=mask, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(Y + t * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [..., 2I] -> [..., I] (new tensor, x's dtype)."""
    shape = x.shape
    two_i = shape[-1]
    assert two_i % 2 == 0, "silu_and_mul needs an even last dim"
    inter = two_i // 2
    x2 = x.reshape(-1, two_i)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    T = x2.shape[0]
    y = torch.empty((T, inter), dtype=x.dtype, device=x.device)
    if T and inter:
        block = min(2048, triton.next_power_of_2(inter))
        _silu_and_mul_kernel[(T, triton.cdiv(inter, block))](
            x2, y, inter, x2.stride(0), y.stride(0), BLOCK=block, num_warps=4 if block <= 1024 else 8,
            **FMA,
        )
    return y.view(*shape[:-1], inter)
