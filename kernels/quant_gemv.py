"""One-row GEMVs over quantized weights, with the batch-1 decode step's small ops fused in.

The quantized twins of gemv.py's kernels (same arguments, the weight a QuantizedWeight of
localsgl/engine/layers/quant.py):

  * ``norm_qkv``: r = x + residual; q|k|v = W_qkv · rmsnorm(r) (+ bias); rotary on q and k;
    k and v written into the KV pool at ``loc``; q returned.
  * ``norm_gate_up``: r = x + residual; a = silu(W_g · rmsnorm(r)) * (W_u · rmsnorm(r)).
  * ``gemv``: y = W · x (o_proj, down_proj, LM head).

Math: the weight is dequantized in registers, group by group: y[n] = Σ_groups (s·Σ_k q·n[k]
+ m·Σ_k n[k]) with w = s·q + m the torch reference's w[n, k] = s[n, k/G]·q[n, k] (+ m[n, k/G])
(int4 symmetric: q = u − 8), computed like gemv.py's K-loop programs: each program owns two
blocks of BLOCK_R rows ("a" and "b", the rotary pairs / gate and up rows / two halves),
streams BLOCK_K columns (whole groups) per step and accumulates in fp32, n = rmsnorm(s)·g
with the row's inverse RMS applied once at the end.  Per-row scales (group = K) are applied
once at the end too.  An int4 tile is read
as BLOCK_K/2 bytes per row; the low nibble of byte j is element 2j, the high one 2j + 1, so
the activations are read as their even and odd columns.

Two variants, off unless a tile (Config) asks: ``words`` streams int4 / int8 as int32 words,
each nibble / byte masked in place and its bits read as a subnormal float (16^t·u·2^-149,
x pre-scaled to match), so a weight costs an AND and an FMA and the loop has no shared-memory
shuffle (_qstream_words), and with ``words == 2`` the activations (residual add, norm, pre-scaling,
chunk sums) are prepared once by a kernel of their own instead of per row block; ``split_k`` cuts the plain gemv's rows into column slices whose fp32
partials a second kernel adds (_sum_splits_kernel).

Floor: the packed weight bytes N·K·bits/8 plus N·K/G scale (and offset) bytes over copy
bandwidth; the activations are re-read from L2 by every program (K·elem each, against
2·BLOCK_R·K·bits/8 of weights).  Reference: ``matmul_ref`` in layers/quant.py (dequantize
then multiply), and gemv.py's norm_qkv_ref / norm_gate_up_ref on the dequantized weight.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .gemv import _cos_sin, _qkv_epilogue, _silu_mul
from .pdl import launch_options, wait_for_predecessor
from .quant_tiles import lookup

INT8, INT4, FP8 = 0, 1, 2
_KIND = {"int8": INT8, "int4": INT4, "fp8": FP8}


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
def _act(X, R, G, ROut, kk, write_res, HAS_RES: tl.constexpr, NORM: tl.constexpr, STORE: tl.constexpr = True):
    """Activations of columns kk: s = x (+ residual, stored to ROut where kk < write_res, with
    STORE); returns (s·g or s in fp32, s² in fp32)."""
    x = tl.load(X + kk)
    if HAS_RES:
        x = (x.to(tl.float32) + tl.load(R + kk).to(tl.float32)).to(ROut.dtype.element_ty)
        if STORE:
            tl.store(ROut + kk, x, mask=kk < write_res)
    xf = x.to(tl.float32)
    sq = xf * xf
    if NORM:
        xf = xf * tl.load(G + kk).to(tl.float32)
    return xf, sq


# x's column p of a word is pre-scaled by 2^(89 - 4·(p % 4)): times the subnormal nibble
# 16^(p % 4)·q·2^-149 the product is q·x·2^-60, normal for |q·x| > 2^-66, and x·2^89 stays
# finite for |x| < 2^39; the word sums are scaled back by 2^60 with the group's scale.
_X_SCALE0 = tl.constexpr(6.189700196426902e+26)  # 2^89
_X_SCALE1 = tl.constexpr(3.8685626227668134e+25)  # 2^85
_X_SCALE2 = tl.constexpr(2.4178516392292583e+24)  # 2^81
_X_SCALE3 = tl.constexpr(1.5111572745182865e+23)  # 2^77
_WORD_SUM_SCALE = tl.constexpr(1.152921504606847e+18)  # 2^60


@triton.jit
def _split8(x):
    """[..., 8] -> its 8 columns (in-thread: no data movement)."""
    a, b = tl.split(tl.reshape(x, x.shape[:-1] + [4, 2]))  # columns 0,2,4,6 / 1,3,5,7
    a0, a1 = tl.split(tl.reshape(a, a.shape[:-1] + [2, 2]))  # 0,4 / 2,6
    b0, b1 = tl.split(tl.reshape(b, b.shape[:-1] + [2, 2]))  # 1,5 / 3,7
    c0, c4 = tl.split(a0)
    c2, c6 = tl.split(a1)
    c1, c5 = tl.split(b0)
    c3, c7 = tl.split(b1)
    return c0, c1, c2, c3, c4, c5, c6, c7


@triton.jit
def _split4(w):
    """[R, 4C] -> the four [R, C] tensors of words 4c, 4c + 1, 4c + 2, 4c + 3."""
    a, b = tl.split(tl.reshape(w, [w.shape[0], w.shape[1] // 4, 2, 2]))
    w0, w2 = tl.split(a)
    w1, w3 = tl.split(b)
    return w0, w1, w2, w3


@triton.jit
def _word_dot(w, x):
    """Σ_p q_p·x[..., p]·2^-60 over the 8 nibbles of int32 words w (column 8j + p at bits 4p),
    x pre-scaled by _X_SCALE0..3.  Each nibble is masked in place and its bits read as a subnormal
    float, 16^t·q·2^-149 (t = p % 4; the high half-word shifted down once): one AND and one
    FMA per weight, no int -> float conversion and no magic-number subtraction."""
    x0, x1, x2, x3, x4, x5, x6, x7 = _split8(x)
    u = w.to(tl.uint32, bitcast=True)
    h = u >> 16
    p = (u & 0xF).to(tl.float32, bitcast=True) * x0
    p += (u & 0xF0).to(tl.float32, bitcast=True) * x1
    p += (u & 0xF00).to(tl.float32, bitcast=True) * x2
    p += (u & 0xF000).to(tl.float32, bitcast=True) * x3
    p += (h & 0xF).to(tl.float32, bitcast=True) * x4
    p += (h & 0xF0).to(tl.float32, bitcast=True) * x5
    p += (h & 0xF00).to(tl.float32, bitcast=True) * x6
    p += (h & 0xF000).to(tl.float32, bitcast=True) * x7
    return p


@triton.jit
def _split4_last(x):
    """[..., 4] -> its 4 columns."""
    a, b = tl.split(tl.reshape(x, x.shape[:-1] + [2, 2]))  # columns 0,2 / 1,3
    c0, c2 = tl.split(a)
    c1, c3 = tl.split(b)
    return c0, c1, c2, c3


@triton.jit
def _byte_dot(w, x):
    """Σ_p (q_p + 128)·x[..., p]·2^-60 over the 4 int8 values q of int32 words w (column 4j + p
    at bits 8p), x pre-scaled by 2^89 / 2^81 for even / odd p: the sign bits flipped once per
    word (q + 128 in 0..255), each byte masked in place and read as a subnormal float."""
    x0, x1, x2, x3 = _split4_last(x)
    u = w.to(tl.uint32, bitcast=True) ^ 0x80808080
    h = u >> 16
    p = (u & 0xFF).to(tl.float32, bitcast=True) * x0
    p += (u & 0xFF00).to(tl.float32, bitcast=True) * x1
    p += (h & 0xFF).to(tl.float32, bitcast=True) * x2
    p += (h & 0xFF00).to(tl.float32, bitcast=True) * x3
    return p


@triton.jit
def _words_accumulate(acc_a, acc_b, a0, a1, a2, a3, b0, b1, b2, b3, y0, y1, y2, y3, xs, S, Mn, ra, rb, stride_s,
                      k0, c, KIND: tl.constexpr, LOG2G: tl.constexpr, SYM: tl.constexpr, ROW_SCALE: tl.constexpr):
    """One step of the words loops: the 4-word chunks a*, b* (int4 or int8) against the pre-scaled
    activations y0..y3 of their columns, whose unscaled chunk sums are xs; adds Σ q·x of each chunk,
    times its group's scale (plus offset·xs), to acc_a / acc_b ([rows, chunks])."""
    E: tl.constexpr = 8 if KIND == 1 else 4
    if KIND == 1:
        BIAS: tl.constexpr = 8.0 if SYM else 0.0  # q = u - 8 (symmetric int4)
        pa = (_word_dot(a0, y0) + _word_dot(a1, y1)) + (_word_dot(a2, y2) + _word_dot(a3, y3))
        pb = (_word_dot(b0, y0) + _word_dot(b1, y1)) + (_word_dot(b2, y2) + _word_dot(b3, y3))
    else:
        BIAS: tl.constexpr = 128.0  # q = (q + 128) - 128
        pa = (_byte_dot(a0, y0) + _byte_dot(a1, y1)) + (_byte_dot(a2, y2) + _byte_dot(a3, y3))
        pb = (_byte_dot(b0, y0) + _byte_dot(b1, y1)) + (_byte_dot(b2, y2) + _byte_dot(b3, y3))
    pa = pa * _WORD_SUM_SCALE - BIAS * xs  # Σ q·x over the chunk
    pb = pb * _WORD_SUM_SCALE - BIAS * xs
    if ROW_SCALE:
        acc_a += pa
        acc_b += pb
    else:
        gidx = ((k0 + 4 * E * c) >> LOG2G)[None, :]
        acc_a += tl.load(S + ra * stride_s + gidx).to(tl.float32) * pa
        acc_b += tl.load(S + rb * stride_s + gidx).to(tl.float32) * pb
        if not SYM:
            acc_a += tl.load(Mn + ra * stride_s + gidx).to(tl.float32) * xs
            acc_b += tl.load(Mn + rb * stride_s + gidx).to(tl.float32) * xs
    return acc_a, acc_b


@triton.jit
def _row_sums(acc_a, acc_b, S, rows_a, rows_b, stride_s, ROW_SCALE: tl.constexpr):
    """The rows' sums of the chunk accumulators, times the row's scale when the weight is row-scaled."""
    ya = tl.sum(acc_a, 1)
    yb = tl.sum(acc_b, 1)
    if ROW_SCALE:
        ya = ya * tl.load(S + rows_a.to(tl.int64) * stride_s).to(tl.float32)
        yb = yb * tl.load(S + rows_b.to(tl.int64) * stride_s).to(tl.float32)
    return ya, yb


@triton.jit
def _qstream_words(
    QW, S, Mn, stride_q, stride_s, rows_a, rows_b, X, R, G, ROut, K0, K1, write_res,
    KIND: tl.constexpr, LOG2G: tl.constexpr, SYM: tl.constexpr, ROW_SCALE: tl.constexpr, HAS_RES: tl.constexpr,
    NORM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """int4 / int8 as int32 words (QW an int32 view, stride_q in words): _qstream_rows's sums
    over columns [K0, K1) and Σ s² there.  A step loads [BLOCK_R, BLOCK_K/E] words per row block
    (E = 8 int4 / 4 int8 values per word), 4 consecutive words (a chunk of 4E columns, within one
    group: G >= 4E, a power of two) per thread, whatever the group size; x is loaded as
    [BLOCK_R, BLOCK_K/(4E), E] per word of those four, broadcast over the rows, so it lands in
    the weights' layout (no shared-memory shuffle); one scale (and offset) per row and chunk,
    indexed by a shift so it is not vectorized across groups.  Per weight: an AND and an FMA
    (_word_dot, _byte_dot)."""
    E: tl.constexpr = 8 if KIND == 1 else 4
    C: tl.constexpr = BLOCK_K // (4 * E)
    c = tl.arange(0, C)
    xoff = (4 * E * c)[None, :, None] + tl.arange(0, E)[None, None, :] + tl.zeros([BLOCK_R, 1, 1], tl.int32)
    if KIND == 1:
        t = tl.arange(0, 8) % 4
        xscale = tl.where(t == 0, _X_SCALE0, tl.where(t == 1, _X_SCALE1, tl.where(t == 2, _X_SCALE2, _X_SCALE3)))
    else:
        xscale = tl.where(tl.arange(0, 4) % 2 == 0, _X_SCALE0, _X_SCALE2)
    xscale = xscale[None, None, :]
    ra = rows_a.to(tl.int64)[:, None]
    rb = rows_b.to(tl.int64)[:, None]
    qa = QW + ra * stride_q + tl.arange(0, BLOCK_K // E)[None, :]
    qb = QW + rb * stride_q + tl.arange(0, BLOCK_K // E)[None, :]
    acc_a = tl.zeros([BLOCK_R, C], tl.float32)
    acc_b = tl.zeros([BLOCK_R, C], tl.float32)
    ss = tl.zeros([BLOCK_R, C, E], tl.float32)
    if HAS_RES:  # r = x + residual stored once, before the loop: a store among the row-broadcast
        # loads would make every row's copy load and convert x again
        for k in range(0, write_res, 1024):
            kr = k + tl.arange(0, 1024)
            r = tl.load(X + kr, mask=kr < write_res).to(tl.float32) + tl.load(R + kr, mask=kr < write_res).to(tl.float32)
            tl.store(ROut + kr, r.to(ROut.dtype.element_ty), mask=kr < write_res)
    for k0 in range(K0, K1, BLOCK_K):
        a0, a1, a2, a3 = _split4(tl.load(qa + k0 // E))
        b0, b1, b2, b3 = _split4(tl.load(qb + k0 // E))
        x0, q0 = _act(X, R, G, ROut, k0 + xoff, write_res, HAS_RES, NORM, False)
        x1, q1 = _act(X, R, G, ROut, k0 + E + xoff, write_res, HAS_RES, NORM, False)
        x2, q2 = _act(X, R, G, ROut, k0 + 2 * E + xoff, write_res, HAS_RES, NORM, False)
        x3, q3 = _act(X, R, G, ROut, k0 + 3 * E + xoff, write_res, HAS_RES, NORM, False)
        ss += (q0 + q1) + (q2 + q3)
        y0 = x0 * xscale
        y1 = x1 * xscale
        y2 = x2 * xscale
        y3 = x3 * xscale
        xs = tl.sum((x0 + x1) + (x2 + x3), 2)
        acc_a, acc_b = _words_accumulate(acc_a, acc_b, a0, a1, a2, a3, b0, b1, b2, b3, y0, y1, y2, y3, xs,
                                         S, Mn, ra, rb, stride_s, k0, c, KIND, LOG2G, SYM, ROW_SCALE)
    ya, yb = _row_sums(acc_a, acc_b, S, rows_a, rows_b, stride_s, ROW_SCALE)
    # ss holds each column once per row of the block
    return ya, yb, tl.sum(tl.sum(tl.sum(ss, 2), 1), 0) / BLOCK_R


@triton.jit
def _prep_act_kernel(X, R, G, ROut, XP, XS, K, eps, E: tl.constexpr, HAS_RES: tl.constexpr, NORM: tl.constexpr,
                     BLOCK: tl.constexpr, PDL: tl.constexpr):
    """The activations of the ``words == 2`` GEMVs, once per call instead of once per row block:
    XP[k] = n[k] pre-scaled as _qstream_words scales x (by column k % E of its word), in fp32;
    XS[j] = Σ n over the 4E-column chunk j; n = rmsnorm(s)·g with NORM (every program sums the
    whole row's squares: K is a hidden size, a few KiB from L2), else s; s = x (+ residual,
    stored to ROut in the activations' dtype).  Program i writes columns [i·BLOCK, (i + 1)·BLOCK)."""
    wait_for_predecessor(PDL)
    offs = tl.arange(0, BLOCK)
    inv = 1.0
    if NORM:
        ss = tl.zeros([BLOCK], tl.float32)
        for k in range(0, K, BLOCK):
            _, sq = _act(X, R, G, ROut, k + offs, 0, HAS_RES, False, False)
            ss += sq
        inv = tl.rsqrt(tl.sum(ss, 0) / K + eps)
    kk = tl.program_id(0) * BLOCK + offs
    n, _ = _act(X, R, G, ROut, kk, K, HAS_RES, NORM, True)
    n = n * inv
    t = kk % E
    if E == 8:
        xscale = tl.where(t % 4 == 0, _X_SCALE0, tl.where(t % 4 == 1, _X_SCALE1, tl.where(t % 4 == 2, _X_SCALE2, _X_SCALE3)))
    else:
        xscale = tl.where(t % 2 == 0, _X_SCALE0, _X_SCALE2)
    tl.store(XP + kk, n * xscale)
    CH: tl.constexpr = 4 * E
    chunks = tl.sum(tl.reshape(n, [BLOCK // CH, CH]), 1)
    tl.store(XS + tl.program_id(0) * (BLOCK // CH) + tl.arange(0, BLOCK // CH), chunks)


@triton.jit
def _qstream_prepped(
    QW, S, Mn, stride_q, stride_s, rows_a, rows_b, XP, XS, K0, K1,
    KIND: tl.constexpr, LOG2G: tl.constexpr, SYM: tl.constexpr, ROW_SCALE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """_qstream_words over activations _prep_act_kernel prepared (pre-scaled, normalised, with
    their chunk sums): the loop loads them as they are, so a weight costs its AND and FMA and a
    share of one fp32 load, with no per-row conversion, norm or sum of x."""
    E: tl.constexpr = 8 if KIND == 1 else 4
    C: tl.constexpr = BLOCK_K // (4 * E)
    c = tl.arange(0, C)
    xoff = (4 * E * c)[None, :, None] + tl.arange(0, E)[None, None, :] + tl.zeros([BLOCK_R, 1, 1], tl.int32)
    ra = rows_a.to(tl.int64)[:, None]
    rb = rows_b.to(tl.int64)[:, None]
    qa = QW + ra * stride_q + tl.arange(0, BLOCK_K // E)[None, :]
    qb = QW + rb * stride_q + tl.arange(0, BLOCK_K // E)[None, :]
    acc_a = tl.zeros([BLOCK_R, C], tl.float32)
    acc_b = tl.zeros([BLOCK_R, C], tl.float32)
    for k0 in range(K0, K1, BLOCK_K):
        a0, a1, a2, a3 = _split4(tl.load(qa + k0 // E))
        b0, b1, b2, b3 = _split4(tl.load(qb + k0 // E))
        y0 = tl.load(XP + k0 + xoff)
        y1 = tl.load(XP + k0 + E + xoff)
        y2 = tl.load(XP + k0 + 2 * E + xoff)
        y3 = tl.load(XP + k0 + 3 * E + xoff)
        xs = tl.load(XS + k0 // (4 * E) + c)[None, :]
        acc_a, acc_b = _words_accumulate(acc_a, acc_b, a0, a1, a2, a3, b0, b1, b2, b3, y0, y1, y2, y3, xs,
                                         S, Mn, ra, rb, stride_s, k0, c, KIND, LOG2G, SYM, ROW_SCALE)
    return _row_sums(acc_a, acc_b, S, rows_a, rows_b, stride_s, ROW_SCALE)


@triton.jit
def _qstream_rows(
    QW, S, Mn, stride_q, stride_s, rows_a, rows_b, X, R, G, ROut, K, K0, K1, write_res, eps,
    KIND: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr, ROW_SCALE: tl.constexpr,
    HAS_RES: tl.constexpr, NORM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
    WORDS: tl.constexpr, LOG2G: tl.constexpr, PREP: tl.constexpr = False,
):
    """(Σ_k W[a,k]·n[k], Σ_k W[b,k]·n[k]) over columns [K0, K1) of the dequantized weight,
    n = rmsnorm(s) or s (the norm needs the whole row: K0 = 0, K1 = K): int4 as int32 words
    with WORDS (_qstream_words), over prepared activations with PREP too (X: _prep_act_kernel's
    XP, R: its XS; the norm and the residual are done), else group by group (_qstream_groups)."""
    if PREP:
        wait_for_predecessor(PDL)
        ya, yb = _qstream_prepped(QW, S, Mn, stride_q, stride_s, rows_a, rows_b, X, R, K0, K1,
                                  KIND, LOG2G, SYM, ROW_SCALE, BLOCK_R, BLOCK_K)
    elif WORDS:
        wait_for_predecessor(PDL)
        ya, yb, ssum = _qstream_words(QW, S, Mn, stride_q, stride_s, rows_a, rows_b, X, R, G, ROut, K0, K1,
                                      write_res, KIND, LOG2G, SYM, ROW_SCALE, HAS_RES, NORM, BLOCK_R, BLOCK_K)
        if NORM:
            inv = tl.rsqrt(ssum / K + eps)
            ya = ya * inv
            yb = yb * inv
    else:
        ya, yb = _qstream_groups(QW, S, Mn, stride_q, stride_s, rows_a, rows_b, X, R, G, ROut, K, K0, K1, write_res,
                                 eps, KIND, GROUP, SYM, ROW_SCALE, HAS_RES, NORM, BLOCK_R, BLOCK_K, PDL)
    return ya, yb


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


@triton.jit
def _qgemv_kernel(X, XS, QW, S, Mn, Out, Part, K, N, stride_q, stride_s,
                  KIND: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr, ROW_SCALE: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
                  WORDS: tl.constexpr, LOG2G: tl.constexpr, SPLIT: tl.constexpr, PREP: tl.constexpr):
    """Rows of program 0's axis, columns [k·K/SPLIT, (k + 1)·K/SPLIT) of program 1's axis k:
    the sums go to Out, or with SPLIT > 1 to the fp32 partials Part[k] (_sum_splits adds them)."""
    pid = tl.program_id(0)
    rows_a = pid * (2 * BLOCK_R) + tl.arange(0, BLOCK_R)
    rows_b = rows_a + BLOCK_R
    k_len = tl.multiple_of(K // SPLIT, BLOCK_K)  # the launcher checks it: aligned, vectorized loads
    k_lo = tl.multiple_of(tl.program_id(1) * k_len, BLOCK_K)
    ya, yb = _qstream_rows(QW, S, Mn, stride_q, stride_s, rows_a, rows_b, X, XS, X, Out, K, k_lo, k_lo + k_len,
                           0, 0.0, KIND, GROUP, SYM, ROW_SCALE, False, False, BLOCK_R, BLOCK_K, PDL, WORDS, LOG2G, PREP)
    if SPLIT == 1:
        tl.store(Out + rows_a, ya.to(Out.dtype.element_ty))
        tl.store(Out + rows_b, yb.to(Out.dtype.element_ty))
    else:
        part = Part + tl.program_id(1).to(tl.int64) * N
        tl.store(part + rows_a, ya)
        tl.store(part + rows_b, yb)


@triton.jit
def _sum_splits_kernel(Part, Out, N, SPLIT: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Out[n] = Σ_k Part[k, n], in a fixed order (the result does not depend on timing)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    wait_for_predecessor(PDL)
    acc = tl.load(Part + offs, mask=mask, other=0.0)
    for k in tl.static_range(1, SPLIT):
        acc += tl.load(Part + k * N + offs, mask=mask, other=0.0)
    tl.store(Out + offs, acc.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _qnorm_gate_up_kernel(X, R, G, ROut, QW, S, Mn, Out, K, I, eps, stride_q, stride_s,
                          KIND: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr, ROW_SCALE: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
                          WORDS: tl.constexpr, LOG2G: tl.constexpr, PREP: tl.constexpr):
    pid = tl.program_id(0)
    rows_a = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    g, u = _qstream_rows(QW, S, Mn, stride_q, stride_s, rows_a, rows_a + I, X, R, G, ROut, K, 0, K,
                         tl.where(pid == 0, K, 0), eps, KIND, GROUP, SYM, ROW_SCALE, True, True, BLOCK_R, BLOCK_K, PDL,
                         WORDS, LOG2G, PREP)
    tl.store(Out + rows_a, _silu_mul(g, u).to(Out.dtype.element_ty))


@triton.jit
def _qnorm_qkv_kernel(
    X, R, G, ROut, QW, S, Mn, Bias, CS, Pos, Loc, Q, KC, VC,
    K, eps, stride_q, stride_s, stride_cs, stride_kct, stride_kch, stride_vct, stride_vch,
    HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr,
    KIND: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr, ROW_SCALE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr, WORDS: tl.constexpr, LOG2G: tl.constexpr,
    PREP: tl.constexpr,
):
    pid = tl.program_id(0)
    HALF: tl.constexpr = D // 2
    PER_HEAD: tl.constexpr = HALF // BLOCK_R
    head = pid // PER_HEAD
    d = (pid % PER_HEAD) * BLOCK_R + tl.arange(0, BLOCK_R)
    rows_a = head * D + d
    ya, yb = _qstream_rows(QW, S, Mn, stride_q, stride_s, rows_a, rows_a + HALF, X, R, G, ROut, K, 0, K,
                           tl.where(pid == 0, K, 0), eps, KIND, GROUP, SYM, ROW_SCALE, HAS_RES, True,
                           BLOCK_R, BLOCK_K, PDL, WORDS, LOG2G, PREP)
    c, s = _cos_sin(CS, tl.load(Pos).to(tl.int64), stride_cs, head, d, HQ, HKV, HALF)
    _qkv_epilogue(ya, yb, head, d, c, s, tl.load(Loc).to(tl.int64), Bias, Q, KC, VC,
                  stride_kct, stride_kch, stride_vct, stride_vch, HQ, HKV, D, HAS_BIAS)


# ---------------------------------------------------------------------------- configs
class Config(NamedTuple):
    """BLOCK_R rows per half-block, BLOCK_K columns per step (a multiple of the group size).

    ``split_k`` (plain ``gemv`` only; the fused kernels need whole rows): each row block's
    columns are cut into that many slices, one program each, whose fp32 partial sums a second
    small kernel adds — more programs and bytes in flight for weights with few rows and long
    rows (o_proj, down_proj).  Partials and a fixed-order sum rather than atomics: the result
    does not depend on timing, and nothing needs zeroing before the kernel.
    ``words`` (int4 / int8, see ``words_apply``; else ignored): stream int32 words
    (_qstream_words) instead of group-sized byte tiles; 2: the same over activations that a
    small kernel prepared first (_prep_act_kernel, _qstream_prepped), one launch more for less
    work per weight."""

    block_r: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 1
    split_k: int = 1
    words: int = 0


# bytes of packed weights per row and step: 128 (int4: 256 columns; int8 / fp8: 128)
_CUDA = {"int4": (8, 256, 4), "int8": (8, 128, 4), "fp8": (8, 128, 4)}


def row_scaled(w) -> bool:
    """One scale per row, applied after the sum (int8 / fp8 symmetric with group = K)."""
    return w.fmt.kind != "int4" and w.mins is None and w.group >= w.in_features


def block_k(w, target: int) -> int | None:
    """The largest power of two <= target (at least 16) that divides K and, unless the weight
    is row-scaled, is a multiple of the group size (whole groups per step)."""
    K, g = w.in_features, w.group
    bk = max(target, g if not row_scaled(w) else 16)
    while bk >= 16:
        if K % bk == 0 and (row_scaled(w) or bk % g == 0):
            return bk
        bk //= 2
    return None


def default_config(w, rows_per_block: int, device_type: str) -> Config | None:
    """The tile for weight ``w`` whose row blocks come in multiples of ``rows_per_block``: the
    tuned one (quant_tiles.py) where it fits, else the built-in default; None when it does not
    tile (callers take the layer path)."""
    if device_type == "cuda":
        t = lookup("gemv", w, 1, w.qweight.device)
        if t is not None:
            cfg = Config(*t)
            if rows_per_block % (2 * cfg.block_r) == 0 and block_k(w, cfg.block_k) == cfg.block_k \
                    and w.in_features % (cfg.block_k * max(1, cfg.split_k)) == 0:
                return cfg
    r, target, warps = _CUDA[w.fmt.kind] if device_type == "cuda" else (4, 64, 4)
    bk = block_k(w, target)
    if bk is None:
        return None
    return Config(min(r, rows_per_block), bk, warps, 1)


def words_apply(w, cfg: Config) -> bool:
    """Whether ``cfg.words`` takes effect for ``w``: int4 or int8, row-scaled or with a
    power-of-two group of at least one chunk (32 int4 / 16 int8 columns), and a packed weight
    that reads as int32 words (row bytes a multiple of 4, contiguous)."""
    if not cfg.words or w.fmt.kind not in ("int4", "int8"):
        return False
    q, g = w.qweight, w.group
    chunk = 32 if w.fmt.kind == "int4" else 16
    return (row_scaled(w) or (g >= chunk and g & (g - 1) == 0)) and cfg.block_k % chunk == 0 \
        and q.stride(-1) == 1 and q.stride(0) % 4 == 0 and q.storage_offset() % 4 == 0


def _qweight(w, words: bool) -> tuple[torch.Tensor, int]:
    """The packed weight as the kernel reads it (int32 words with WORDS) and its row stride."""
    q = w.qweight.view(torch.int32) if words else w.qweight
    return q, q.stride(0)


def _meta(w, cfg: Config, device) -> dict:
    words = words_apply(w, cfg)
    return dict(KIND=_KIND[w.fmt.kind], GROUP=w.group, SYM=w.mins is None, ROW_SCALE=row_scaled(w),
                BLOCK_R=cfg.block_r, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                WORDS=words, LOG2G=w.group.bit_length() - 1 if words and not row_scaled(w) else 0,
                PREP=words and cfg.words == 2, **launch_options(device))


def _prepare(w, x, residual, norm_w, eps, r_out) -> tuple[torch.Tensor, torch.Tensor]:
    """_prep_act_kernel's (XP, XS) for the ``words == 2`` GEMVs: x (+ residual, stored to r_out),
    rmsnorm-ed with norm_w when given."""
    K = x.numel()
    E = 8 if w.fmt.kind == "int4" else 4
    block = 1024
    while K % block:  # words_apply: K is a multiple of a 4E-column chunk, a power of two
        block //= 2
    xp = torch.empty(K, dtype=torch.float32, device=x.device)
    xs = torch.empty(K // (4 * E), dtype=torch.float32, device=x.device)
    _prep_act_kernel[(K // block,)](
        x, residual if residual is not None else x, norm_w if norm_w is not None else x,
        r_out if r_out is not None else x, xp, xs, K, eps, E=E, HAS_RES=residual is not None,
        NORM=norm_w is not None, BLOCK=block, num_warps=4, **launch_options(x.device))
    return xp, xs


def _mins(w):
    return w.mins if w.mins is not None else w.scales


def _check_row(x: torch.Tensor, K: int) -> torch.Tensor:
    assert x.numel() == K, f"expected one row of {K} elements, got {tuple(x.shape)}"
    return x.reshape(K) if x.is_contiguous() else x.reshape(K).contiguous()


# ---------------------------------------------------------------------------- launchers
def gemv_supported(w, device_type: str) -> bool:
    cfg = default_config(w, w.out_features, device_type)
    return cfg is not None and w.out_features % (2 * cfg.block_r) == 0


def gemv(x, w, out_dtype=None, config: Config | None = None):
    """One row: x [1, K] -> W·x [1, N] in out_dtype (default x's)."""
    N, K = w.out_features, w.in_features
    cfg = config or default_config(w, N, x.device.type)
    assert cfg is not None
    split = max(1, cfg.split_k)
    assert N % (2 * cfg.block_r) == 0 and K % (cfg.block_k * split) == 0
    out = torch.empty((1, N), dtype=out_dtype or x.dtype, device=x.device)
    part = torch.empty((split, N), dtype=torch.float32, device=x.device) if split > 1 else out
    meta = _meta(w, cfg, x.device)
    qw, stride_q = _qweight(w, meta["WORDS"])
    xr = _check_row(x, K)
    xp, xs = _prepare(w, xr, None, None, 0.0, None) if meta["PREP"] else (xr, xr)
    _qgemv_kernel[(N // (2 * cfg.block_r), split)](
        xp, xs, qw, w.scales, _mins(w), out, part, K, N, stride_q, w.scales.stride(0), SPLIT=split, **meta)
    if split > 1:
        _sum_splits_kernel[(triton.cdiv(N, 1024),)](part, out, N, SPLIT=split, BLOCK=1024, num_warps=4,
                                                     **launch_options(x.device))
    return out


def norm_gate_up_supported(w, device_type: str) -> bool:
    I = w.out_features // 2
    cfg = default_config(w, I, device_type)
    return cfg is not None and I % cfg.block_r == 0


def norm_gate_up(x, residual, norm_w, eps, w, config: Config | None = None):
    """One token: r = x + residual; returns (silu(W_g·n) * (W_u·n) [1, I], r [1, H]), n = rmsnorm(r)."""
    K = x.shape[-1]
    I = w.out_features // 2
    assert w.in_features == K
    cfg = config or default_config(w, I, x.device.type)
    assert cfg is not None and I % cfg.block_r == 0 and K % cfg.block_k == 0
    r_out = torch.empty(K, dtype=residual.dtype, device=x.device)
    out = torch.empty((1, I), dtype=x.dtype, device=x.device)
    meta = _meta(w, cfg, x.device)
    qw, stride_q = _qweight(w, meta["WORDS"])
    xr, rr = _check_row(x, K), _check_row(residual, K)
    if meta["PREP"]:
        xr, rr = _prepare(w, xr, rr, norm_w, eps, r_out)
    _qnorm_gate_up_kernel[(I // cfg.block_r,)](
        xr, rr, norm_w, r_out, qw, w.scales, _mins(w), out, K, I, eps,
        stride_q, w.scales.stride(0), **meta)
    return out, r_out.view(1, K)


def norm_qkv_supported(w, head_dim: int, rotary_dim: int, device_type: str) -> bool:
    if rotary_dim != head_dim or head_dim % 2:
        return False
    cfg = default_config(w, head_dim // 2, device_type)
    return cfg is not None and (head_dim // 2) % cfg.block_r == 0


def norm_qkv(x, residual, norm_w, eps, w, bias, cos_sin, positions, loc, k_cache, v_cache,
             num_heads: int, num_kv_heads: int, config: Config | None = None):
    """gemv.norm_qkv over a quantized W_qkv: returns (q [1, Hq, D], r [1, H]); k and v are
    in the pool at loc[0]."""
    K = x.shape[-1]
    D = k_cache.shape[-1]
    N = w.out_features
    assert N == (num_heads + 2 * num_kv_heads) * D and w.in_features == K
    assert cos_sin.shape[-1] == D and cos_sin.dtype == torch.float32 and cos_sin.stride(-1) == 1
    cfg = config or default_config(w, D // 2, x.device.type)
    assert cfg is not None and (D // 2) % cfg.block_r == 0 and K % cfg.block_k == 0
    xr = _check_row(x, K)
    has_res = residual is not None
    if has_res:
        rr = _check_row(residual, K)
        r_out = torch.empty(K, dtype=residual.dtype, device=x.device)
    else:
        rr = r_out = xr
    q = torch.empty((1, num_heads, D), dtype=x.dtype, device=x.device)
    meta = _meta(w, cfg, x.device)
    qw, stride_q = _qweight(w, meta["WORDS"])
    xk, rk = xr, rr
    if meta["PREP"]:
        xk, rk = _prepare(w, xr, rr if has_res else None, norm_w, eps, r_out if has_res else None)
    _qnorm_qkv_kernel[(N // cfg.block_r // 2,)](
        xk, rk, norm_w, r_out, qw, w.scales, _mins(w), bias if bias is not None else w.scales, cos_sin,
        positions, loc, q, k_cache, v_cache,
        K, eps, stride_q, w.scales.stride(0), cos_sin.stride(0), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1), HQ=num_heads, HKV=num_kv_heads, D=D, HAS_RES=has_res,
        HAS_BIAS=bias is not None, **meta)
    return q, r_out.view(1, K)
