"""y = x Wᵀ for int4 weights in groups of 64 or more at 16-64 rows, on int8 tensor cores: the rows
of x rounded to int8 per group (W4A8), the stored nibbles the dot's other int8 operand.

Why: the 64-row int4 GEMM (quant_gemm) waits on latency with few programs resident a SM, and its
x tile (bf16, 16 KB a 64 x 128 step) takes most of its shared memory; here that tile is int8
(8 KB), the weights need no float math at all (two byte ops make the nibbles int8), and the
int8 MMA runs at twice the bf16 rate.

Math: a group g of G columns of row m is x̂ = dx·q, dx = amax / 127, q = round(x / dx) in int8
(``prepare``; XSUM = dx·Σq).  With u the stored nibble (low: even column, high: odd one) and w =
s·u + o (o the group's min, or −8·s when symmetric):
    y[m, n] = Σ_g s_g·dx_g·(Σ_even u·q + Σ_odd u·q) + o_g·XSUM_g
— two int8 dots of K = G/2 each (the even and the odd columns, which ``prepare`` lays out as two
planes a group), accumulated in int32 and scaled into fp32 once a group.  Exact for x̂ up to the
fp32 scaling; x̂ differs from x by at most dx / 2 per element.  With SPLIT > 1 the groups are cut
into slices whose fp32 partial tiles a second launch sums in order.

Rounding per group of 128 costs more than the GEMVs' 32 columns: +2.1 % perplexity on the
embedded model against +0.8 % (``scripts/int8act_quality.py --chunk 128``); the engine's
int8_activations switch turns it off with the others.

Floor: packed bytes + scales over copy bandwidth.  Reference: the dequantized weight times x̂
(tests/kernels/test_quant_a8.py).  Off unless this GPU's tuned file (quant_tiles.py) holds an
"a8" entry with a tile for the weight (its N's or the nearest one's) at the bucket of the batch's
rows (16 or 64: batches of 16 to 64 rows, as the GEMM's tuned tiles); scripts/probe_quant_a8.py
writes a tile where the kernel beats the GEMM's tuned tile and a null one where it does not
(which shapes take it on the H200: bench/RESULTS.md, "2026-12-04 (eighteenth session)").
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .options import FMA
from .quant_gemm import tuned_rows
from .quant_gemv import _sum_splits_kernel
from .quant_tiles import lookup
from .quant_words import _round_int8


class Config(NamedTuple):
    block_m: int  # rows of x a program owns
    block_n: int  # weight rows a program owns
    num_warps: int = 4
    num_stages: int = 3
    swap_ab: int = 0  # the tile computed transposed (the weight the dot's left operand)
    split_k: int = 1  # the groups cut into this many slices, one program each


@triton.jit
def _prep_a8_kernel(X, XQ, DX, XSUM, K, NG, stride_x, GROUP: tl.constexpr, GB: tl.constexpr):
    """Groups [program_id(0)·GB, +GB) of row program_id(1) of x: q in int8 into XQ (K bytes a
    row; a group's even columns, then its odd ones), dx and dx·Σq into DX and XSUM (NG a row)."""
    m = tl.program_id(1).to(tl.int64)
    g = tl.program_id(0) * GB + tl.arange(0, GB)
    cols = g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    q, dx = _round_int8(tl.load(X + m * stride_x + cols).to(tl.float32))  # [GB, GROUP]: the GEMVs' rounding
    tl.store(DX + m * NG + g, dx)
    tl.store(XSUM + m * NG + g, dx * tl.sum(q, 1))
    even, odd = tl.split(tl.reshape(q.to(tl.int8), [GB, GROUP // 2, 2]))
    half = g[:, None] * GROUP + tl.arange(0, GROUP // 2)[None, :]
    tl.store(XQ + m * K + half, even)
    tl.store(XQ + m * K + half + GROUP // 2, odd)


@triton.jit
def _a8_kernel(XQ, DX, XSUM, QW, S, Mn, Y, M, N, K, NG, stride_q, stride_s, stride_y,
               GROUP: tl.constexpr, SYM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               SWAP_AB: tl.constexpr, SPLIT: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] tile of y (with SPLIT > 1: one slice of the groups' fp32 partial
    sum, at Y + slice·M·N), a group a step: two int8 dots, then s·dx·dot + o·XSUM in fp32."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    H: tl.constexpr = GROUP // 2
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rm = tl.minimum(offs_m, M - 1).to(tl.int64)  # rows past M reread the last one, never stored
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    hs = tl.arange(0, H)
    xq = XQ + rm[:, None] * K + hs[None, :]
    qw = QW + rn[:, None] * stride_q + hs[None, :]
    per = NG // SPLIT
    g0 = pid_k * per
    if SWAP_AB:
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for g in range(g0, g0 + per):
        w = tl.load(qw + g * H)  # [BLOCK_N, H] uint8
        lo = (w & 0xF).to(tl.int8)
        hi = (w >> 4).to(tl.int8)
        xe = tl.load(xq + g * GROUP)  # [BLOCK_M, H] int8
        xo = tl.load(xq + g * GROUP + H)
        s = tl.load(S + rn * stride_s + g).to(tl.float32)
        if SYM:
            o = -8.0 * s
        else:
            o = tl.load(Mn + rn * stride_s + g).to(tl.float32)
        dx = tl.load(DX + rm * NG + g)
        xs = tl.load(XSUM + rm * NG + g)
        if SWAP_AB:
            d = tl.dot(lo, tl.trans(xe), out_dtype=tl.int32)
            d = tl.dot(hi, tl.trans(xo), d, out_dtype=tl.int32)
            acc += d.to(tl.float32) * (s[:, None] * dx[None, :]) + o[:, None] * xs[None, :]
        else:
            d = tl.dot(xe, tl.trans(lo), out_dtype=tl.int32)
            d = tl.dot(xo, tl.trans(hi), d, out_dtype=tl.int32)
            acc += d.to(tl.float32) * (dx[:, None] * s[None, :]) + xs[:, None] * o[None, :]
    if SWAP_AB:
        acc = tl.trans(acc)
    y = Y + pid_k.to(tl.int64) * M * N + offs_m.to(tl.int64)[:, None] * stride_y + rn[None, :]
    tl.store(y, acc.to(Y.dtype.element_ty), mask=(offs_m < M)[:, None] & (rn < N)[None, :])


def applies(w, rows: int, cfg: Config | None) -> bool:
    """int4 in groups of 64 or more (the half dots need K >= 32), contiguous packed rows, whole
    weight-row blocks and slices, at 16 rows or more."""
    if cfg is None or rows < 16 or w.fmt.kind != "int4" or w.group < 64:
        return False
    K, N = w.in_features, w.out_features
    ng = K // w.group
    return (K % w.group == 0 and w.qweight.stride(-1) == 1 and N % cfg.block_n == 0
            and ng % max(1, cfg.split_k) == 0)


def tuned_config(w, rows: int, device: torch.device) -> Config | None:
    """This GPU's tuned "a8" tile for ``w`` at ``rows`` rows where one exists and applies, and the
    weight lets its activations be rounded to int8 (the engine's int8_activations switch)."""
    if device.type != "cuda" or not getattr(w, "int8_activations", True) or tuned_rows(rows) is None:
        return None
    t = lookup("a8", w, tuned_rows(rows), device)
    cfg = Config(*t) if t is not None else None
    return cfg if applies(w, rows, cfg) else None


def prepare(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] as int8 per group: (XQ [M, K] int8, each group's even columns then its odd ones;
    DX [M, K/group] fp32; XSUM [M, K/group] fp32 = dx·Σq)."""
    M, K = x.shape
    ng = K // group
    gb = 1
    while gb < 8 and ng % (2 * gb) == 0:
        gb *= 2
    xq = torch.empty((M, K), dtype=torch.int8, device=x.device)
    dx = torch.empty((M, ng), dtype=torch.float32, device=x.device)
    xsum = torch.empty((M, ng), dtype=torch.float32, device=x.device)
    _prep_a8_kernel[(ng // gb, M)](x, xq, dx, xsum, K, ng, x.stride(0), GROUP=group, GB=gb, num_warps=4, **FMA)
    return xq, dx, xsum


def matmul(x: torch.Tensor, w, config: Config, out_dtype=None) -> torch.Tensor:
    """x [M, K] (M >= 16) @ Wᵀ -> [M, N] in out_dtype (default x's), over x rounded to int8 per
    group (module docstring)."""
    M, K = x.shape
    assert K == w.in_features and applies(w, M, config), f"{w.fmt.label()}: {config} does not apply"
    if x.stride(-1) != 1:
        x = x.contiguous()
    xq, dx, xsum = prepare(x, w.group)
    N, ng = w.out_features, K // w.group
    split = max(1, config.split_k)
    y = torch.empty((M, N), dtype=out_dtype or x.dtype, device=x.device)
    out = y if split == 1 else torch.empty((split, M, N), dtype=torch.float32, device=x.device)
    grid = (N // config.block_n, triton.cdiv(M, config.block_m), split)
    _a8_kernel[grid](
        xq, dx, xsum, w.qweight, w.scales, w.mins if w.mins is not None else w.scales, out, M, N, K, ng,
        w.qweight.stride(0), w.scales.stride(0), N if split > 1 else y.stride(0),
        GROUP=w.group, SYM=w.mins is None, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        SWAP_AB=bool(config.swap_ab), SPLIT=split, num_warps=config.num_warps, num_stages=config.num_stages, **FMA)
    if split > 1:
        _sum_splits_kernel[(triton.cdiv(M * N, 1024),)](out, y, M * N, SPLIT=split, BLOCK=1024, PDL=False,
                                                         num_warps=4, **FMA)
    return y
