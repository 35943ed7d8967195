"""Rows of activations quantized to int8 in groups of columns, for the int4 GEMM's integer dots
(quant_gemm.py, ``Config.a8``).

Math, per row r of x [M, K] and group g of G columns: dx = amax|x[r, g·G : (g+1)·G]| / 127,
q = round(x·(127 / amax)) (half away from zero, within ±127; the division correctly rounded, so
the kernel and ``quantize_ref`` give the same bits), so that x̂ = dx·q differs from x by at most
dx / 2 per value (the llama.cpp GPU kernels' Q8_1 activations, quant_words.py's ``words == 3``
GEMVs' scheme); S[r, 2g] = dx and S[r, 2g + 1] = Σ x̂ over the group (what a group's offset
multiplies).  One program per row and BLOCK columns of whole groups: the row is read once
and written at a byte per value.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _int8_groups_kernel(X, Q, S, stride_x, stride_q, stride_s, GROUP: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    col0 = tl.program_id(1) * BLOCK
    x = tl.load(X + row * stride_x + col0 + tl.arange(0, BLOCK)).to(tl.float32)
    NG: tl.constexpr = BLOCK // GROUP
    xg = tl.reshape(x, [NG, GROUP])
    amax = tl.max(tl.abs(xg), 1)
    inv = tl.where(amax > 0, tl.math.div_rn(tl.full([NG], 127.0, tl.float32), tl.maximum(amax, 1e-30)), 0.0)
    v = xg * inv[:, None]
    q = tl.minimum(tl.maximum(tl.where(v >= 0, tl.floor(v + 0.5), -tl.floor(0.5 - v)), -127.0), 127.0)
    dx = amax / 127.0
    tl.store(Q + row * stride_q + col0 + tl.arange(0, BLOCK), tl.reshape(q, [BLOCK]).to(tl.int8))
    g = col0 // GROUP + tl.arange(0, NG)
    tl.store(S + row * stride_s + 2 * g, dx)
    tl.store(S + row * stride_s + 2 * g + 1, dx * tl.sum(q, 1))


def quantize(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (rows contiguous, K a multiple of ``group``, a power of two) -> (q [M, K] int8,
    s [M, 2·K/group] fp32: each group's dx and Σ x̂)."""
    assert x.dim() == 2 and x.stride(-1) == 1
    M, K = x.shape
    assert K % group == 0 and group & (group - 1) == 0, f"K={K} is not a multiple of the group {group}"
    q = torch.empty((M, K), dtype=torch.int8, device=x.device)
    s = torch.empty((M, 2 * (K // group)), dtype=torch.float32, device=x.device)
    if M:
        block = max(group, min(1024, K))
        while K % block:
            block //= 2
        _int8_groups_kernel[(M, K // block)](x, q, s, x.stride(0), q.stride(0), s.stride(0), GROUP=group, BLOCK=block,
                                             num_warps=4)
    return q, s


def quantize_ref(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same in torch ops (the reference)."""
    M, K = x.shape
    xg = x.float().reshape(M, K // group, group)
    amax = xg.abs().amax(-1)
    inv = torch.where(amax > 0, 127.0 / amax.clamp_min(1e-30), torch.zeros_like(amax))
    v = xg * inv[..., None]
    q = (torch.sign(v) * torch.floor(v.abs() + 0.5)).clamp(-127, 127)
    dx = amax / 127.0
    s = torch.stack([dx, dx * q.sum(-1)], dim=-1).reshape(M, -1)
    return q.reshape(M, K).to(torch.int8), s
