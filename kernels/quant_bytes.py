"""The byte tiles of the quantized one-row GEMVs (quant_gemv.py's tiles without ``words``): the
weight read a byte per value (int8 / fp8) or two values per byte (int4: the low nibble of byte j is
column 2j, the high one 2j + 1), dequantized group by group in registers; and the unpacking
helpers quant_gemm.py shares.  The math and the floor are in quant_gemv.py's docstring.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .pdl import wait_for_predecessor
from .quant_words import _act


@triton.jit
def nibbles(b, SYM: tl.constexpr):
    """uint8 bytes -> fp32 (low nibble, high nibble), minus 8 when symmetric.  By the 2^23 trick:
    OR-ing the 4 bits into the mantissa of 2^23 and subtracting 2^23 is two full-rate ops, where
    an int -> float conversion issues at a quarter of the FMA rate."""
    bi = b.to(tl.int32)
    if SYM:
        off = 8388616.0
    else:
        off = 8388608.0
    lo = ((bi & 0x0F) | 0x4B000000).to(tl.float32, bitcast=True) - off
    hi = ((bi >> 4) | 0x4B000000).to(tl.float32, bitcast=True) - off
    return lo, hi


@triton.jit
def group_params(S, Mn, rows, stride_s, group_index, SYM: tl.constexpr):
    """Scale and offset [R] of one group of columns of ``rows`` (offset 0 when symmetric)."""
    off = rows.to(tl.int64) * stride_s + group_index
    s = tl.load(S + off).to(tl.float32)
    if SYM:
        m = tl.zeros_like(s)
    else:
        m = tl.load(Mn + off).to(tl.float32)
    return s, m


@triton.jit
def _qstream_groups(
    QW, S, Mn, stride_q, stride_s, rows_a, rows_b, X, R, G, ROut, K, K0, K1, write_res, eps,
    KIND: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr, ROW_SCALE: tl.constexpr,
    HAS_RES: tl.constexpr, NORM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):
    """_qstream_rows over the byte-packed weight.  Each BLOCK_K step walks its groups (sub-tiles
    of SUB columns, unrolled): a group's products q·n are accumulated per element with its
    scale, s·(q·n), and its offset as m·Σn per row, so a weight costs its unpacking and two
    FMAs."""
    ra = rows_a.to(tl.int64)[:, None] * stride_q
    rb = rows_b.to(tl.int64)[:, None] * stride_q
    SUB: tl.constexpr = BLOCK_K if ROW_SCALE else GROUP
    NS: tl.constexpr = BLOCK_K // SUB
    off_a = tl.zeros([BLOCK_R], tl.float32)  # Σ over groups of m·Σn
    off_b = tl.zeros([BLOCK_R], tl.float32)
    wait_for_predecessor(PDL)
    if KIND == 1:  # int4: byte j of a row's group holds its columns 2j and 2j + 1
        HALF: tl.constexpr = SUB // 2
        offs = tl.arange(0, HALF)
        acc_a = tl.zeros([BLOCK_R, HALF], tl.float32)
        acc_b = tl.zeros([BLOCK_R, HALF], tl.float32)
        ss = tl.zeros([HALF], tl.float32)
        for k0 in range(K0, K1, BLOCK_K):
            for j in tl.static_range(NS):
                kj = k0 + j * SUB
                ke = kj + 2 * offs
                xe, se = _act(X, R, G, ROut, ke, write_res, HAS_RES, NORM)
                xo, so = _act(X, R, G, ROut, ke + 1, write_res, HAS_RES, NORM)
                ss += se + so
                ae, ao = nibbles(tl.load(QW + ra + (kj // 2 + offs)[None, :]), SYM)
                be, bo = nibbles(tl.load(QW + rb + (kj // 2 + offs)[None, :]), SYM)
                sa, ma = group_params(S, Mn, rows_a, stride_s, kj // GROUP, SYM)
                sb, mb = group_params(S, Mn, rows_b, stride_s, kj // GROUP, SYM)
                acc_a += sa[:, None] * (ae * xe[None, :] + ao * xo[None, :])
                acc_b += sb[:, None] * (be * xe[None, :] + bo * xo[None, :])
                if not SYM:
                    xs = tl.sum(xe + xo, 0)
                    off_a += ma * xs
                    off_b += mb * xs
    else:  # int8 / fp8: one value per byte
        offs = tl.arange(0, SUB)
        acc_a = tl.zeros([BLOCK_R, SUB], tl.float32)
        acc_b = tl.zeros([BLOCK_R, SUB], tl.float32)
        ss = tl.zeros([SUB], tl.float32)
        for k0 in range(K0, K1, BLOCK_K):
            for j in tl.static_range(NS):
                kk = k0 + j * SUB + offs
                xf, sq = _act(X, R, G, ROut, kk, write_res, HAS_RES, NORM)
                ss += sq
                wa = tl.load(QW + ra + kk[None, :]).to(tl.float32)
                wb = tl.load(QW + rb + kk[None, :]).to(tl.float32)
                if ROW_SCALE:
                    acc_a += wa * xf[None, :]
                    acc_b += wb * xf[None, :]
                else:
                    sa, ma = group_params(S, Mn, rows_a, stride_s, (k0 + j * SUB) // GROUP, SYM)
                    sb, mb = group_params(S, Mn, rows_b, stride_s, (k0 + j * SUB) // GROUP, SYM)
                    acc_a += sa[:, None] * (wa * xf[None, :])
                    acc_b += sb[:, None] * (wb * xf[None, :])
                    if not SYM:
                        xs = tl.sum(xf, 0)
                        off_a += ma * xs
                        off_b += mb * xs
    ya = tl.sum(acc_a, 1) + off_a
    yb = tl.sum(acc_b, 1) + off_b
    if ROW_SCALE:
        ya = ya * tl.load(S + rows_a.to(tl.int64) * stride_s).to(tl.float32)
        yb = yb * tl.load(S + rows_b.to(tl.int64) * stride_s).to(tl.float32)
    if NORM:
        inv = tl.rsqrt(tl.sum(ss, 0) / K + eps)
        ya = ya * inv
        yb = yb * inv
    return ya, yb
