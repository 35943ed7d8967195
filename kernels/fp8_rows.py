"""Rows of activations quantized to fp8 e4m3 with one scale each, for torch._scaled_mm.

Math, per row r of x [M, K]: s_r = max(max_k |x[r, k]|, 1e-12)·(1/448) in fp32 (448: e4m3's
largest finite value), q[r, k] = e4m3(clamp(x[r, k] / s_r, ±448)), rounded to nearest even,
so that x ≈ s_r·q.  The division is the correctly rounded one (``div_rn``), the scale a
product, and the rounding to e4m3 done in fp32 arithmetic (kv_store's ``_round_to_e4m3``: the
interpreter's own cast rounds wrongly), so the kernel and the torch reference
(``quantize_rows_ref``) give the same bits.

One program per row: a first pass over the row for its largest magnitude, a second that
writes the e4m3 bytes (the row, ≤ 28 KiB in bf16, is still in L1/L2).  Floor: the row read
once from DRAM and written at a byte per value, 3 bytes per value for bf16 input.  One kernel
replaces six torch ops (abs, amax, float, div, clamp, cast), which take ~30x as long on an H200
(bench/RESULTS.md, "2026-12-03 (eighth session)").
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .kv_store import _round_to_e4m3
from .options import FMA

E4M3_MAX = 448.0


@triton.jit
def _fp8_rows_kernel(X, Q, S, K, stride_x, stride_q, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    amax = tl.zeros([BLOCK], tl.float32)
    for k in range(0, K, BLOCK):
        x = tl.load(X + row * stride_x + k + offs, mask=k + offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    s = tl.maximum(tl.max(amax, 0), 1e-12) * (1.0 / 448.0)
    tl.store(S + row, s)
    for k in range(0, K, BLOCK):
        m = k + offs < K
        x = tl.load(X + row * stride_x + k + offs, mask=m, other=0.0).to(tl.float32)
        q = _round_to_e4m3(tl.minimum(tl.maximum(tl.math.div_rn(x, s), -448.0), 448.0))
        tl.store(Q + row * stride_q + k + offs, q.to(tl.float8e4nv), mask=m)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (bf16 / fp16 / fp32, rows contiguous) -> (q [M, K] e4m3, s [M, 1] fp32)."""
    assert x.dim() == 2 and x.stride(-1) == 1
    M, K = x.shape
    q = torch.empty((M, K), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((M, 1), dtype=torch.float32, device=x.device)
    if M:
        block = min(2048, triton.next_power_of_2(K))
        _fp8_rows_kernel[(M,)](x, q, s, K, x.stride(0), q.stride(0), BLOCK=block, num_warps=8 if block >= 2048 else 4, **FMA)
    return q, s


def quantize_rows_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same in torch ops (the reference, and the route where the kernel cannot run)."""
    s = x.abs().amax(-1, keepdim=True).float().clamp_min(1e-12) * (1.0 / E4M3_MAX)
    q = (x.float() / s).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, s
