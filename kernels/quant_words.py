"""int4 / int8 one-row GEMVs over int32 words, the inner loops of quant_gemv.py's ``words``
variants.

A word holds 8 nibbles (int4) or 4 bytes (int8) of one row.  Each is masked in place and its
bits read as a subnormal float (16^t·u·2^-149 for nibble t of a half-word; bytes alike), against
activations pre-scaled to match, so a weight costs an AND and an FMA and no int -> float
conversion; the chunk's sum is scaled back once, with the group's scale and offset.  Two loops:

  * ``_qstream_words``: each row block converts, normalises and pre-scales its own copy of the
    activations (``words == 1``);
  * ``_qstream_prepped``: ``_prep_act_kernel`` prepares them once per call (residual add,
    RMSNorm, pre-scaling, chunk sums), laid out in planes, one per value position of a word, so
    that each plane loads in the words' own layout and the loop needs no layout conversion
    (``words == 2``): one launch more, about 3 instructions per weight instead of 5;
  * ``_qstream_prepped`` with INT8: the prepared activations quantized to int8, one scale per chunk of 4E
    columns (amax / 127), packed four to an int32 word in the order of the weights' values, so
    that ``dp4a`` (4 byte products summed into an int32, one instruction) takes a word of weights
    against a word of activations (``words == 3``): about 5 instructions per 8 int4 weights.  The
    result is exact for the quantized activations x̂ = dx·round(x / dx), which differ from x by at
    most dx / 2 (the llama.cpp GPU kernels' scheme, Q8_1 activations).

Reference: the dequantized weight times the activations (quant_gemv.py's references); tests in
tests/kernels/test_quant_gemv.py.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .l2_prefetch import kernel_args as prefetch_args, prefetch_spans
from .options import FMA
from .pdl import launch_options, wait_for_predecessor


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
# dp4a as PTX on the GPU; under the interpreter (no inline assembly) the same integer math by shifts
_ASM = tl.constexpr(os.environ.get("TRITON_INTERPRET", "") in ("", "0"))


@triton.jit
def _x_scale(p, E: tl.constexpr):
    """The pre-scale of the activation at column p of an int32 word of E values: 2^(89 - 4·(p % 4))
    for int4 (E = 8), 2^(89 - 8·(p % 2)) for int8 (E = 4)."""
    if E == 8:
        t = p % 4
        return tl.where(t == 0, _X_SCALE0, tl.where(t == 1, _X_SCALE1, tl.where(t == 2, _X_SCALE2, _X_SCALE3)))
    else:
        return tl.where(p % 2 == 0, _X_SCALE0, _X_SCALE2)


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
    """One step of _qstream_words: the 4-word chunks a*, b* (int4 or int8) against the pre-scaled
    activations y0..y3 of their columns, whose unscaled chunk sums are xs (_scale_chunks)."""
    if KIND == 1:
        pa = (_word_dot(a0, y0) + _word_dot(a1, y1)) + (_word_dot(a2, y2) + _word_dot(a3, y3))
        pb = (_word_dot(b0, y0) + _word_dot(b1, y1)) + (_word_dot(b2, y2) + _word_dot(b3, y3))
    else:
        pa = (_byte_dot(a0, y0) + _byte_dot(a1, y1)) + (_byte_dot(a2, y2) + _byte_dot(a3, y3))
        pb = (_byte_dot(b0, y0) + _byte_dot(b1, y1)) + (_byte_dot(b2, y2) + _byte_dot(b3, y3))
    return _scale_chunks(acc_a, acc_b, pa, pb, xs, S, Mn, ra, rb, stride_s, k0, c, KIND, LOG2G, SYM, ROW_SCALE)


@triton.jit
def _scale_chunks(acc_a, acc_b, pa, pb, xs, S, Mn, ra, rb, stride_s, k0, c, KIND: tl.constexpr, LOG2G: tl.constexpr,
                  SYM: tl.constexpr, ROW_SCALE: tl.constexpr, INT_SUMS: tl.constexpr = False):
    """Adds to acc_a / acc_b ([rows, chunks]) Σ q·x of each 4-word chunk, from the words' scaled sums
    pa / pb (Σ (stored value)·x·2^-60; INT_SUMS: Σ (stored value)·x, int8 bytes as they are) and
    the chunk's sum of x, xs: times its group's scale (plus offset·xs); a row-scaled weight gets
    its scale at the end (_row_sums)."""
    E: tl.constexpr = 8 if KIND == 1 else 4
    if KIND == 1:
        BIAS: tl.constexpr = 8.0 if SYM else 0.0  # q = u - 8 (symmetric int4)
    elif INT_SUMS:
        BIAS: tl.constexpr = 0.0
    else:
        BIAS: tl.constexpr = 128.0  # q = (q + 128) - 128
    if not INT_SUMS:
        pa = pa * _WORD_SUM_SCALE  # Σ q·x over the chunk
        pb = pb * _WORD_SUM_SCALE
    if BIAS != 0.0:
        pa -= BIAS * xs
        pb -= BIAS * xs
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
def _words_tile(QW, stride_q, rows_a, rows_b, KIND: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """_qstream_words's indexing: chunk indices c [C], the activations' column offsets of a
    step [BLOCK_R, C, E] (the same for every row: x lands in the weights' layout), the row
    offsets ra / rb [BLOCK_R, 1] and the word pointers qa / qb [BLOCK_R, BLOCK_K/E] of the two
    row blocks at column 0."""
    E: tl.constexpr = 8 if KIND == 1 else 4
    c = tl.arange(0, BLOCK_K // (4 * E))
    xoff = (4 * E * c)[None, :, None] + tl.arange(0, E)[None, None, :] + tl.zeros([BLOCK_R, 1, 1], tl.int32)
    ra = rows_a.to(tl.int64)[:, None]
    rb = rows_b.to(tl.int64)[:, None]
    qa = QW + ra * stride_q + tl.arange(0, BLOCK_K // E)[None, :]
    qb = QW + rb * stride_q + tl.arange(0, BLOCK_K // E)[None, :]
    return c, xoff, ra, rb, qa, qb


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
    c, xoff, ra, rb, qa, qb = _words_tile(QW, stride_q, rows_a, rows_b, KIND, BLOCK_R, BLOCK_K)
    xscale = _x_scale(tl.arange(0, E), E)[None, None, :]
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
def _plane_index(kk, E: tl.constexpr, BK: tl.constexpr):
    """Where column kk lands in the prepared activations (_prep_act_kernel): its step's planes."""
    r = kk % BK
    return kk - r + (r % E) * (BK // E) + r // E


@triton.jit
def _store_planes(XP, XS, n, kk, ok, chunk0, K, E: tl.constexpr, BK: tl.constexpr, BLOCK: tl.constexpr):
    """n (columns kk, where ok) into _prep_act_kernel's layout for words of E values and BK-column
    steps: XP in planes, pre-scaled; XS[chunk0 + j] the sum of the block's 4E-column chunk j."""
    CH: tl.constexpr = 4 * E
    tl.store(XP + _plane_index(kk, E, BK), n * _x_scale(kk % E, E), mask=ok)
    j = tl.arange(0, BLOCK // CH)
    tl.store(XS + chunk0 + j, tl.sum(tl.reshape(n, [BLOCK // CH, CH]), 1), mask=chunk0 + j < K // CH)


@triton.jit
def _round_int8(x):
    """Each row of x [R, C] (fp32) as dx·q: q = round(x / dx) in [-127, 127] (as fp32), dx = amax|x| / 127
    ([R]; 0 and q = 0 for an all-zero row)."""
    amax = tl.max(tl.abs(x), 1)
    inv = tl.where(amax > 0, 127.0 / tl.maximum(amax, 1e-30), 0.0)
    q = tl.minimum(tl.maximum(tl.floor(x * inv[:, None] + 0.5), -127.0), 127.0)
    return q, amax / 127.0


@triton.jit
def zero_share(Z, NZ, pid, programs, BLOCK: tl.constexpr):
    """Program ``pid`` of ``programs`` sets its share of the NZ fp32 of Z to 0 (the output a GEMV
    then adds its two K halves into), BLOCK at a time."""
    per = tl.cdiv(NZ, programs)
    z0 = pid * per
    for z in range(z0, z0 + per, BLOCK):
        zo = z + tl.arange(0, BLOCK)
        tl.store(Z + zo, tl.zeros([BLOCK], tl.float32), mask=(zo < z0 + per) & (zo < NZ))


@triton.jit
def _store_int8(XQ, XS, n, col0, K, E: tl.constexpr, BK: tl.constexpr, BLOCK: tl.constexpr):
    """n (columns col0 + [0, BLOCK)) for ``words == 3``: each chunk of CH = 4E columns as
    x̂ = dx·q, dx = amax|n| / 127, q = round(n / dx) in int8, and XS[2j], XS[2j + 1] = dx, Σ x̂
    of chunk j.  XQ (int32 words): int8 weights (E = 4) take word j = bytes q[4j..4j+3] against
    their word j; int4 weights (E = 8) two words per weight word, q of its even columns and of
    its odd ones (the nibbles ``w & 0x0F0F0F0F`` and ``(w >> 4) & 0x0F0F0F0F`` hold), placed per
    BK-column step as two planes of BK/8 words."""
    CH: tl.constexpr = 4 * E
    NC: tl.constexpr = BLOCK // CH
    q, dx = _round_int8(tl.reshape(n, [NC, CH]))
    j = col0 // CH + tl.arange(0, NC)
    jok = j < K // CH
    tl.store(XS + 2 * j, dx, mask=jok)
    tl.store(XS + 2 * j + 1, dx * tl.sum(q, 1), mask=jok)
    qb = q.to(tl.int32) & 0xFF
    shifts = (8 * tl.arange(0, 4))[None, :]
    if E == 4:
        words = tl.sum(tl.reshape(qb, [BLOCK // 4, 4]) << shifts, 1)  # disjoint bytes: the sum is their OR
        wj = col0 // 4 + tl.arange(0, BLOCK // 4)
        tl.store(XQ + wj, words, mask=wj < K // 4)
    else:
        even, odd = tl.split(tl.reshape(qb, [BLOCK // 8, 4, 2]))
        W: tl.constexpr = BK // 8
        wj = col0 // 8 + tl.arange(0, BLOCK // 8)  # the weight word
        at = wj + (wj // W) * W  # step s's planes start at 2W·s
        tl.store(XQ + at, tl.sum(even << shifts, 1), mask=wj < K // 8)
        tl.store(XQ + at + W, tl.sum(odd << shifts, 1), mask=wj < K // 8)


@triton.jit
def _prep_act_kernel(X, R, G, ROut, XP, XS, K, eps, E: tl.constexpr, HAS_RES: tl.constexpr, NORM: tl.constexpr,
                     BLOCK: tl.constexpr, PDL: tl.constexpr, ONE_PASS: tl.constexpr = False, BK: tl.constexpr = 1024,
                     XP2=None, XS2=None, E2: tl.constexpr = 0, BK2: tl.constexpr = 1024, INT8: tl.constexpr = False,
                     Z=None, NZ=0, ZERO: tl.constexpr = False,
                     P0=None, N0=0, P1=None, N1=0, P2=None, N2=0, PF_PROGS: tl.constexpr = 0,
                     PF_LANES: tl.constexpr = 128):
    """The activations of the ``words == 2`` GEMVs, once per call instead of once per row block,
    in planes per BK-column step of the GEMV: XP[i·BK + p·BK/E + j] = n[i·BK + E·j + p] pre-scaled
    as _qstream_words scales it (by its column p in word j), in fp32, so that plane p of a step
    lines up with the step's words as they are loaded (no layout conversion) at a constant offset
    from plane 0 (no address arithmetic per plane); XS[j] = Σ n over the 4E-column chunk j;
    n = rmsnorm(s)·g with NORM, else s; s = x (+ residual, stored to ROut in the activations'
    dtype).  ONE_PASS: one
    program holds the whole row (BLOCK >= K), so the norm's sum and the output take one round of
    loads; else program i writes columns [i·BLOCK, (i + 1)·BLOCK), each summing the whole row's
    squares first with NORM (K is a hidden size, a few KiB from L2).  E2 > 0: the same n also in
    the layout of words of E2 values and BK2-column steps, to XP2 / XS2 (a row stack whose blocks
    stream words of two widths from one preparation).  INT8: n quantized for ``words == 3``
    instead (_store_int8).  ZERO: the programs also zero the NZ fp32 of Z between them (the
    output that the GEMV after this kernel adds its two K halves into).  PF_PROGS > 0: that many
    programs more, after the others, only prefetch the spans P0..P2 (the next GEMV's weights,
    l2_prefetch.py) into L2, PF_LANES lines at a time (one a thread), then wait."""
    n_real = tl.num_programs(0) - PF_PROGS
    pf = tl.program_id(0) >= n_real if PF_PROGS > 0 else False
    if pf:
        prefetch_spans(P0, N0, P1, N1, P2, N2, tl.program_id(0) - n_real, PF_PROGS, PF_LANES)
        wait_for_predecessor(PDL)
    else:
        wait_for_predecessor(PDL)
        if ZERO:  # after the wait: until its predecessor finished, Z's memory may still be another's
            zero_share(Z, NZ, tl.program_id(0), n_real, BLOCK)
        offs = tl.arange(0, BLOCK)
        if ONE_PASS:
            kk = offs
            ok = kk < K
            x = tl.load(X + kk, mask=ok, other=0.0)
            if HAS_RES:
                x = (x.to(tl.float32) + tl.load(R + kk, mask=ok, other=0.0).to(tl.float32)).to(ROut.dtype.element_ty)
                tl.store(ROut + kk, x, mask=ok)
            n = x.to(tl.float32)
            if NORM:
                n = n * tl.rsqrt(tl.sum(n * n, 0) / K + eps) * tl.load(G + kk, mask=ok, other=0.0).to(tl.float32)
            chunk0 = 0
        else:
            inv = 1.0
            if NORM:
                ss = tl.zeros([BLOCK], tl.float32)
                for k in range(0, K, BLOCK):
                    _, sq = _act(X, R, G, ROut, k + offs, 0, HAS_RES, False, False)
                    ss += sq
                inv = tl.rsqrt(tl.sum(ss, 0) / K + eps)
            kk = tl.program_id(0) * BLOCK + offs
            ok = kk < K
            n, _ = _act(X, R, G, ROut, kk, K, HAS_RES, NORM, True)
            n = n * inv
            chunk0 = tl.program_id(0) * BLOCK
        if INT8:
            _store_int8(XP, XS, n, chunk0, K, E, BK, BLOCK)
            if E2 > 0:
                _store_int8(XP2, XS2, n, chunk0, K, E2, BK2, BLOCK)
        else:
            _store_planes(XP, XS, n, kk, ok, chunk0 // (4 * E), K, E, BK, BLOCK)
            if E2 > 0:
                _store_planes(XP2, XS2, n, kk, ok, chunk0 // (4 * E2), K, E2, BK2, BLOCK)


@triton.jit
def _plane_term(ua, ub, mask: tl.constexpr, x, pa, pb):
    """pa, pb += (the value bits ``mask`` of words ua, ub, read as subnormal floats)·x."""
    return pa + (ua & mask).to(tl.float32, bitcast=True) * x, pb + (ub & mask).to(tl.float32, bitcast=True) * x


@triton.jit
def _plane_dot(wa, wb, xp, plane: tl.constexpr, KIND: tl.constexpr):
    """Σ_p (stored value p of a word)·x_p·2^-60 over the E values of each int32 word of wa and of
    wb ([rows, words]), x_p loaded once from plane p of the prepared activations (xp: pointers
    into plane 0, plane: the planes' stride) in the words' own layout: per value an AND and an
    FMA, as in _word_dot and _byte_dot."""
    ua = wa.to(tl.uint32, bitcast=True)
    ub = wb.to(tl.uint32, bitcast=True)
    if KIND != 1:
        ua = ua ^ 0x80808080
        ub = ub ^ 0x80808080
    ha = ua >> 16
    hb = ub >> 16
    pa = tl.zeros(wa.shape, tl.float32)
    pb = tl.zeros(wa.shape, tl.float32)
    if KIND == 1:
        pa, pb = _plane_term(ua, ub, 0xF, tl.load(xp), pa, pb)
        pa, pb = _plane_term(ua, ub, 0xF0, tl.load(xp + plane), pa, pb)
        pa, pb = _plane_term(ua, ub, 0xF00, tl.load(xp + 2 * plane), pa, pb)
        pa, pb = _plane_term(ua, ub, 0xF000, tl.load(xp + 3 * plane), pa, pb)
        pa, pb = _plane_term(ha, hb, 0xF, tl.load(xp + 4 * plane), pa, pb)
        pa, pb = _plane_term(ha, hb, 0xF0, tl.load(xp + 5 * plane), pa, pb)
        pa, pb = _plane_term(ha, hb, 0xF00, tl.load(xp + 6 * plane), pa, pb)
        pa, pb = _plane_term(ha, hb, 0xF000, tl.load(xp + 7 * plane), pa, pb)
    else:
        pa, pb = _plane_term(ua, ub, 0xFF, tl.load(xp), pa, pb)
        pa, pb = _plane_term(ua, ub, 0xFF00, tl.load(xp + plane), pa, pb)
        pa, pb = _plane_term(ha, hb, 0xFF, tl.load(xp + 2 * plane), pa, pb)
        pa, pb = _plane_term(ha, hb, 0xFF00, tl.load(xp + 3 * plane), pa, pb)
    return pa, pb


@triton.jit
def _words_at(q, k, K1, zw, E: tl.constexpr):
    """The weight words of the step at column k, zeros from K1 on (zw: zeros of their shape, so
    the mask is a full-shape tensor, as the interpreter needs): a load issued steps ahead."""
    return tl.load(q + k // E, mask=zw + k < K1, other=0)


@triton.jit
def _step_words(qa, qb, k, K1, zw, E: tl.constexpr):
    """Both row blocks' _words_at."""
    return _words_at(qa, k, K1, zw, E), _words_at(qb, k, K1, zw, E)


@triton.jit
def _qstream_prepped(
    QW, S, Mn, stride_q, stride_s, rows_a, rows_b, XP, XS, K0, K1,
    KIND: tl.constexpr, LOG2G: tl.constexpr, SYM: tl.constexpr, ROW_SCALE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, INT8: tl.constexpr = False, AHEAD: tl.constexpr = 0,
    PDL: tl.constexpr = False,
):
    """_qstream_words over activations _prep_act_kernel prepared (pre-scaled, normalised, in
    planes, with their chunk sums): a step loads [BLOCK_R, BLOCK_K/E] words per row block and,
    per value position p of a word, plane p's [BLOCK_R, BLOCK_K/E] activations (the same for
    every row), so both land in one layout; the products of 4 consecutive words (in-thread)
    make a chunk's sum.  A weight costs its AND and FMA and a share of one fp32 load.  INT8:
    the activations are _store_int8's, the words that pair with the weight words; dp4a sums a
    word's products in an int32 (_int_dot), and a chunk's sum times its scale dx is
    Σ (stored value)·x̂.  It waits for its PDL predecessor (the activations' writer) itself.
    AHEAD (1 or 2): each step's weight words are loaded that many steps before they are used
    (registers double or triple buffered), the first steps' before the wait: Triton pipelines no
    load that feeds no dot, so otherwise a program has one step's words in flight and idles on
    each load.  (ptxas issues a step's next loads after its dp4a, reusing their registers, so
    with 1 a load overlaps only the next step's activation and scale loads; with 2 it has a whole
    step's work to hide behind.)"""
    E: tl.constexpr = 8 if KIND == 1 else 4
    W: tl.constexpr = BLOCK_K // E
    C: tl.constexpr = W // 4
    c = tl.arange(0, C)
    ra = rows_a.to(tl.int64)[:, None]
    rb = rows_b.to(tl.int64)[:, None]
    words = tl.arange(0, W)[None, :]
    qa = QW + ra * stride_q + words
    qb = QW + rb * stride_q + words
    xw = XP + words + tl.zeros([BLOCK_R, 1], tl.int32)  # x lands in the words' layout
    acc_a = tl.zeros([BLOCK_R, C], tl.float32)
    acc_b = tl.zeros([BLOCK_R, C], tl.float32)
    zw = tl.zeros([BLOCK_R, W], tl.int32)
    if AHEAD >= 1:  # weights only: they do not depend on the predecessor
        na, nb = _step_words(qa, qb, K0, K1, zw, E)
    if AHEAD == 2:
        ma, mb = _step_words(qa, qb, K0 + BLOCK_K, K1, zw, E)
    wait_for_predecessor(PDL)
    for k0 in range(K0, K1, BLOCK_K):
        if AHEAD == 2:
            wa, wb = na, nb
            na, nb = ma, mb
            ma, mb = _step_words(qa, qb, k0 + 2 * BLOCK_K, K1, zw, E)
        elif AHEAD == 1:
            wa, wb = na, nb
            na, nb = _step_words(qa, qb, k0 + BLOCK_K, K1, zw, E)
        else:
            wa = tl.load(qa + k0 // E)
            wb = tl.load(qb + k0 // E)
        if INT8:  # int4: step s's two planes start at word 2W·s = k0 / 4; int8: word k0 / 4
            ia, ib = _int_dot(wa, wb, xw + k0 // 4, W, KIND)
            j = 2 * (k0 // (4 * E) + c)[None, :]
            dx = tl.load(XS + j)
            xs = tl.load(XS + j + 1)
            pa = tl.sum(tl.reshape(ia, [BLOCK_R, C, 4]), 2).to(tl.float32) * dx
            pb = tl.sum(tl.reshape(ib, [BLOCK_R, C, 4]), 2).to(tl.float32) * dx
        else:
            pa, pb = _plane_dot(wa, wb, xw + k0, W, KIND)
            pa = tl.sum(tl.reshape(pa, [BLOCK_R, C, 4]), 2)
            pb = tl.sum(tl.reshape(pb, [BLOCK_R, C, 4]), 2)
            xs = tl.load(XS + k0 // (4 * E) + c)[None, :]
        acc_a, acc_b = _scale_chunks(acc_a, acc_b, pa, pb, xs, S, Mn, ra, rb, stride_s, k0, c, KIND, LOG2G, SYM,
                                     ROW_SCALE, INT8)
    return _row_sums(acc_a, acc_b, S, rows_a, rows_b, stride_s, ROW_SCALE)


@triton.jit
def _dp4a(a, b, c, A_SIGNED: tl.constexpr):
    """c + Σ_p a_p·b_p over the 4 bytes of int32 words a and b (b's signed; a's signed with
    A_SIGNED, else unsigned): one instruction on the GPU."""
    if _ASM:
        if A_SIGNED:
            r = tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                          dtype=tl.int32, is_pure=True, pack=1)
        else:
            r = tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                          dtype=tl.int32, is_pure=True, pack=1)
    else:
        r = c
        for p in tl.static_range(4):
            if A_SIGNED:
                ap = (a << (24 - 8 * p)) >> 24
            else:
                ap = (a >> (8 * p)) & 0xFF
            r += ap * ((b << (24 - 8 * p)) >> 24)
    return r


@triton.jit
def _int_dot(wa, wb, xw, W: tl.constexpr, KIND: tl.constexpr):
    """Σ (stored value)·q over each int32 word of wa and of wb ([rows, words]) against the int8
    activations _store_int8 packed (xw: pointers to the step's first plane, W words a plane)."""
    zero = tl.zeros(wa.shape, tl.int32)
    if KIND == 1:
        xe = tl.load(xw)
        xo = tl.load(xw + W)
        ia = _dp4a((wa >> 4) & 0x0F0F0F0F, xo, _dp4a(wa & 0x0F0F0F0F, xe, zero, False), False)
        ib = _dp4a((wb >> 4) & 0x0F0F0F0F, xo, _dp4a(wb & 0x0F0F0F0F, xe, zero, False), False)
    else:
        x = tl.load(xw)
        ia = _dp4a(wa, x, zero, True)
        ib = _dp4a(wb, x, zero, True)
    return ia, ib


# the normed activations of hidden sizes up to this are prepared by one program of 8 warps (16 fp32
# a thread for 4,096, 32 for 8,192); beyond, by programs of 1,024 columns that each sum the row's
# squares first
ONE_PASS_MAX_K = 8192
PREFETCH_PROGRAMS = 64  # programs of a preparation that only prefetch its GEMV's weights


class PreparedRow:
    """The int8 activations (``words == 3``) of a one-row GEMV, for the kernel before it to write in
    its epilogue (decode attention's merge, for o_proj) instead of a preparation launch: XP / XS in
    _store_int8's layout for words of E values and BLOCK_K-column steps, and ``out``, the GEMV's
    output, which that kernel zeroes when ``zero`` (two K halves added into it).  ``filled``: set
    by the launcher that wrote them; the GEMV prepares them itself otherwise.  ``tile``: what the
    GEMV's launcher chose when it made the row, so it does not choose again."""

    def __init__(self, xp, xs, out, zero: bool, E: int, block_k: int, tile=None):
        self.xp, self.xs, self.out, self.zero, self.E, self.block_k = xp, xs, out, zero, E, block_k
        self.tile = tile
        self.filled = False


def values_a_word(w) -> int:
    """E: the stored values an int32 word of ``w`` holds (8 int4, 4 int8)."""
    return 8 if w.fmt.kind == "int4" else 4


def int8_buffers(K: int, E: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Room for a row of K activations as ``words == 3`` reads them: the int8 values in int32 words,
    and each 4E-column chunk's (dx, Σ x̂) (_store_int8)."""
    return (torch.empty(K // 4, dtype=torch.int32, device=device),
            torch.empty(2 * (K // (4 * E)), dtype=torch.float32, device=device))


def prepare_activations(w, x, residual, norm_w, eps, r_out, block_k, second=None,
                        int8: bool = False, zero: torch.Tensor | None = None, prefetch=()) -> tuple[torch.Tensor, ...]:
    """_prep_act_kernel's (XP, XS) for the ``words == 2`` GEMVs of BLOCK_K = block_k: x (+ residual,
    stored to r_out), rmsnorm-ed with norm_w when given.  ``second`` = (w2, block_k2): the same
    launch also returns (XP2, XS2) for w2's words and steps.  ``int8``: for ``words == 3``, XP
    the int8 activations as int32 words and XS each chunk's (dx, Σ x̂) (_store_int8), and so
    XP2 / XS2.  ``zero``: an fp32 tensor the same launch sets to 0.  ``prefetch`` (spans from
    l2_prefetch.spans, the GEMV's own weights): PREFETCH_PROGRAMS more programs pull them into L2."""
    K = x.numel()
    E = values_a_word(w)
    E2 = values_a_word(second[0]) if second is not None else 0
    one_pass = norm_w is not None and K <= ONE_PASS_MAX_K
    if one_pass:  # the norm needs the whole row: one program, one round of loads
        block = triton.next_power_of_2(K)
    else:
        block = 1024
        while K % block:  # words_apply: K is a multiple of a 4E-column chunk, a power of two
            block //= 2
    def buffers(e):
        if int8:
            return int8_buffers(K, e, x.device)
        return (torch.empty(K, dtype=torch.float32, device=x.device),
                torch.empty(K // (4 * e), dtype=torch.float32, device=x.device))

    xp, xs = buffers(E)
    xp2, xs2 = buffers(E2) if E2 else (xp, xs)
    pf = prefetch_args(prefetch, xs)
    pf_progs = PREFETCH_PROGRAMS if pf.pop("PREFETCH") else 0
    warps = 8 if block >= 4096 else 4
    _prep_act_kernel[((1 if one_pass else K // block) + pf_progs,)](
        x, residual if residual is not None else x, norm_w if norm_w is not None else x,
        r_out if r_out is not None else x, xp, xs, K, eps, E=E, HAS_RES=residual is not None,
        NORM=norm_w is not None, BLOCK=block, ONE_PASS=one_pass, BK=block_k, XP2=xp2, XS2=xs2, E2=E2,
        BK2=second[1] if second is not None else 1024, INT8=int8, Z=zero if zero is not None else xs,
        NZ=zero.numel() if zero is not None else 0, ZERO=zero is not None, num_warps=warps,
        PF_PROGS=pf_progs, PF_LANES=32 * warps, **pf, **launch_options(x.device), **FMA)
    return (xp, xs, xp2, xs2) if E2 else (xp, xs)
