"""One-row GEMVs over fp8 e4m3 weights (one scale per row) on the tensor cores.

Why: gemv.py's CUDA-core loop spends about twice bf16's instructions a byte on e4m3 (a conversion
per two values, a widening per value, the product, the sum) and ends every row block with a
cross-warp sum; under Nsight Compute its gate_up reads DRAM at 69 % against bf16's 86 %
(bench/RESULTS.md, "nineteenth session").  Here the row is the dot's right operand: a [BLOCK_K, 16]
tile whose first column is x and the rest zeros, so the tensor cores do the products and the sum,
and a weight costs its conversion to fp16 and its share of the operand loads.

Math: y[n] = s[n] / c · Σ_k f16(W[n, k]) · f16(c·x[k]), fp32 accumulation, c = 2^(14 − ⌈log2 amax|x|⌉)
from a first pass over the program's columns: e4m3 -> fp16 is exact, and c·x lies within ±2^14, so
every element with |x| >= amax·2^-28 keeps 11 significant bits (x itself is bf16 with 8, or fp32).  The
fused gate_up variant computes n = rmsnorm(x + residual)·g: its first pass sums s² and takes
amax|s·g|, then the K-loop over the weights, with silu(W_g·n) · (W_u·n) at the end.  With SPLIT > 1 the plain
GEMV's K is cut into slices whose fp32 partials a second launch sums in order.

Floor: N·K bytes + 4·N of scales over copy bandwidth.  Reference: x @ (W·s)ᵀ in fp64
(tests/kernels/test_gemv_mma.py).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .pdl import launch_options, wait_for_predecessor
from .quant_gemv import _sum_splits_kernel

class Config(NamedTuple):
    block_n: int  # weight rows a program owns (>= 16: the dot's M)
    block_k: int  # columns a step
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1  # plain GEMV only: K cut into this many slices, one program each


@triton.jit
def _x_operand(n, BLOCK_K: tl.constexpr):
    """[BLOCK_K, 16] fp16: column 0 = n (already scaled into fp16's range), the others 0."""
    first = tl.arange(0, 16)[None, :] == 0
    return tl.where(first, n[:, None], 0.0).to(tl.float16)


@triton.jit
def _pre_scale(amax):
    """c = 2^(14 − ⌈log2 amax⌉) (1 for an all-zero x): c·x within ±2^14."""
    e = tl.ceil(tl.log2(tl.maximum(amax, 1e-30)))
    return tl.where(amax > 0, tl.exp2(14.0 - e), 1.0)


@triton.jit
def _mma_rows(W, stride_w, rows, X, R, G, inv, k_lo, k_hi,
              HAS_RES: tl.constexpr, NORM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Σ_k W[rows, k]·n[k] over [k_lo, k_hi) ([BLOCK_N] fp32, before the row scales); n = (x (+
    residual)) · inv (· g with NORM): ``inv`` carries the pre-scale c."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, 16], tl.float32)
    w_ptr = W + rows.to(tl.int64)[:, None] * stride_w + offs_k[None, :]
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + offs_k
        w = tl.load(w_ptr + k0)
        n = tl.load(X + kk).to(tl.float32)
        if HAS_RES:
            n = (n + tl.load(R + kk).to(tl.float32)).to(R.dtype.element_ty).to(tl.float32)
        n = n * inv
        if NORM:
            n = n * tl.load(G + kk).to(tl.float32)
        acc = tl.dot(w.to(tl.float16), _x_operand(n, BLOCK_K), acc)
    return tl.sum(acc, 1)


@triton.jit
def _gemv_mma_kernel(X, W, S, Out, N, K, stride_w, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     SPLIT: tl.constexpr, PDL: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    per = K // SPLIT
    k_lo = pid_k * per
    wait_for_predecessor(PDL)
    amax = tl.zeros([BLOCK_K], tl.float32)
    for k0 in range(k_lo, k_lo + per, BLOCK_K):
        amax = tl.maximum(amax, tl.abs(tl.load(X + k0 + tl.arange(0, BLOCK_K)).to(tl.float32)))
    c = _pre_scale(tl.max(amax, 0))
    y = _mma_rows(W, stride_w, rows, X, X, X, c, k_lo, k_lo + per, False, False, BLOCK_N, BLOCK_K)
    y = y * (tl.load(S + rows).to(tl.float32) / c)
    if SPLIT > 1:
        tl.store(Out + pid_k * N + rows, y)
    else:
        tl.store(Out + rows, y.to(Out.dtype.element_ty))


@triton.jit
def _norm_gate_up_mma_kernel(X, R, G, ROut, W, S, Out, K, I, eps, stride_w,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SUM_K: tl.constexpr, PDL: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    wait_for_predecessor(PDL)
    offs = tl.arange(0, SUM_K)
    ss = tl.zeros([SUM_K], tl.float32)
    amax = tl.zeros([SUM_K], tl.float32)
    for k0 in range(0, K, SUM_K):  # Σ s² and amax|s·g| of the row; program 0 writes s, the next residual
        kk = k0 + offs
        s = (tl.load(X + kk).to(tl.float32) + tl.load(R + kk).to(tl.float32)).to(ROut.dtype.element_ty)
        if pid == 0:
            tl.store(ROut + kk, s)
        sf = s.to(tl.float32)
        ss += sf * sf
        amax = tl.maximum(amax, tl.abs(sf * tl.load(G + kk).to(tl.float32)))
    inv = tl.rsqrt(tl.sum(ss, 0) / K + eps)
    c = _pre_scale(tl.max(amax, 0) * inv)
    g = _mma_rows(W, stride_w, rows, X, R, G, inv * c, 0, K, True, True, BLOCK_N, BLOCK_K)
    u = _mma_rows(W, stride_w, rows + I, X, R, G, inv * c, 0, K, True, True, BLOCK_N, BLOCK_K)
    g = g * (tl.load(S + rows).to(tl.float32) / c)
    u = u * (tl.load(S + rows + I).to(tl.float32) / c)
    tl.store(Out + rows, (g / (1.0 + tl.exp(-g)) * u).to(Out.dtype.element_ty))


def applies(w: torch.Tensor, scales, cfg: Config, rows_per_block: int | None = None) -> bool:
    """e4m3 rows with one scale each, whole row blocks of the tile, whole column steps (per slice)."""
    N, K = w.shape
    rows = rows_per_block if rows_per_block is not None else N
    return (w.dtype == torch.float8_e4m3fn and scales is not None and w.stride(1) == 1
            and rows % cfg.block_n == 0 and K % (cfg.block_k * max(1, cfg.split_k)) == 0)


def gemv(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, config: Config, out_dtype=None) -> torch.Tensor:
    """x [1, K] -> (W·s) x [1, N] in out_dtype (default x's); w [N, K] e4m3, scales [N] fp32."""
    N, K = w.shape
    assert applies(w, scales, config), f"{config} does not apply to {tuple(w.shape)} {w.dtype}"
    xr = x.reshape(-1)
    assert xr.numel() == K and xr.is_contiguous()
    split = max(1, config.split_k)
    out = torch.empty((1, N), dtype=out_dtype or x.dtype, device=x.device)
    part = out if split == 1 else torch.empty((split, N), dtype=torch.float32, device=x.device)
    opts = launch_options(x.device)
    _gemv_mma_kernel[(N // config.block_n, split)](
        xr, w, scales, part, N, K, w.stride(0), BLOCK_N=config.block_n, BLOCK_K=config.block_k, SPLIT=split,
        num_warps=config.num_warps, num_stages=config.num_stages, **opts)
    if split > 1:
        _sum_splits_kernel[(triton.cdiv(N, 1024),)](part, out, N, SPLIT=split, BLOCK=1024, **opts, num_warps=4)
    return out


def norm_gate_up(x, residual, norm_w, eps, w_gate_up, scales, config: Config):
    """One token: r = x + residual; returns (silu(W_g·n) * (W_u·n) [1, I], r [1, H]), n = rmsnorm(r)·g;
    w_gate_up [2I, H] e4m3 (gate rows first), scales [2I]."""
    K = x.shape[-1]
    I = w_gate_up.shape[0] // 2
    assert applies(w_gate_up, scales, config._replace(split_k=1), I) and w_gate_up.shape[1] == K
    xr, rr = x.reshape(-1), residual.reshape(-1)
    r_out = torch.empty(K, dtype=residual.dtype, device=x.device)
    out = torch.empty((1, I), dtype=x.dtype, device=x.device)
    sum_k = min(1024, triton.next_power_of_2(K))
    assert K % sum_k == 0
    _norm_gate_up_mma_kernel[(I // config.block_n,)](
        xr, rr, norm_w, r_out, w_gate_up, scales, out, K, I, eps, w_gate_up.stride(0),
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, SUM_K=sum_k,
        num_warps=config.num_warps, num_stages=config.num_stages, **launch_options(x.device))
    return out, r_out.view(1, K)
