"""y = x Wᵀ for a few rows of x (2..8: decode batches of a few requests) over int4 / int8
weights: the weight streamed once, as the one-row GEMV streams it, each word multiplied
against every row's int8 activations by ``dp4a``.

Why: above one row the quantized matmul otherwise runs the 16-row GEMM tile (quant_gemm),
which dequantizes every weight into a tensor-core dot whose other 8..14 rows are padding; on
an H200 its int4 g128 tiles run at 2.5-3x their byte floor at 16 rows (bench/RESULTS.md,
"sixteenth session"), and a 2-row step costs what a 16-row one does.  Here a weight word
costs the same unpacking as at one row (two ANDs and a shift for 8 int4 weights) plus two
``dp4a`` per row of x, so up to 8 rows stay near the weights' byte floor if the loads keep
enough bytes in flight.

Math (as quant_words' ``words == 3`` GEMV, row by row): each row of x is quantized per chunk of
4E columns (E = 8 int4 / 4 int8 values per int32 word), x̂ = dx·q, dx = amax / 127, by
quant_words._store_int8 into the layout the weight words pair with; a chunk contributes
s·dx·Σ u·q in the loop (u the stored value, s its group's scale) and each group o·Σ_group x̂
after it (o the group's offset m, or −8·s for symmetric int4: q = u − 8); a row-scaled weight's
scale multiplies the row's sum once.  Exact for x̂ up to the fp32 scaling, which differs from x
by at most dx / 2 per element.

Floor: the packed weight bytes plus scales over copy bandwidth (the activations, M·K bytes,
come from L2).  Reference: the dequantized weight times x̂ (tests/kernels/test_quant_rows.py).

Off unless this GPU's tuned file (quant_tiles.py) holds a "rows" entry for the weight's
format and K at the batch's row count (2, 4 or 8: the power of two at or above it), which
scripts/probe_quant_rows.py writes where the kernel beats the GEMM tile.  At 8 rows the loop
(~4 sm_90 instructions a weight for int4, half of them dp4a) is bound by issue, not by bytes.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import quant_gemv as QG
from .quant_tiles import lookup
from .quant_words import _dp4a, _split4, _store_int8

MAX_ROWS = 8


class Config(NamedTuple):
    block_r: int  # weight rows a program owns
    block_k: int  # columns a step (whole 4-word chunks; the activations' planes are laid out per step)
    num_warps: int = 4
    num_stages: int = 1


@triton.jit
def _prep_rows_kernel(X, XQ, XS, K, stride_x, E: tl.constexpr, BK: tl.constexpr, BLOCK: tl.constexpr):
    """Row program_id(1) of x, columns [program_id(0)·BLOCK, +BLOCK), quantized to int8 into its
    own slice of XQ (K / 4 words a row) and XS (2·K / 4E floats a row): _store_int8's layout."""
    m = tl.program_id(1)
    col0 = tl.program_id(0) * BLOCK
    n = tl.load(X + m.to(tl.int64) * stride_x + col0 + tl.arange(0, BLOCK)).to(tl.float32)
    _store_int8(XQ + m.to(tl.int64) * (K // 4), XS + m.to(tl.int64) * (2 * (K // (4 * E))), n, col0, K, E, BK, BLOCK)


@triton.jit
def _row_step(acc, w, lo, hi, xw, XSm, j, s, o, zero, KIND: tl.constexpr, SYM: tl.constexpr,
              ROW_SCALE: tl.constexpr, OFFSETS: tl.constexpr, W: tl.constexpr, C: tl.constexpr,
              BLOCK_R: tl.constexpr):
    """acc [R, C] + one step of one row of x: its int8 words (xw: [R, W] pointers, the same for
    every weight row, so they land in the weights' layout) against the step's weight words w
    (int4: their even / odd nibbles lo, hi), 4 words (in-thread) a chunk chained through dp4a's
    accumulator into one int32 (no adds), scaled into fp32; plus the chunk's group offset o times
    its Σx̂ where a group is one chunk (OFFSETS == 1)."""
    if KIND == 1:  # the step's two planes: even columns, then odd ones
        l0, l1, l2, l3 = _split4(lo)
        h0, h1, h2, h3 = _split4(hi)
        xe0, xe1, xe2, xe3 = _split4(tl.load(xw))
        xo0, xo1, xo2, xo3 = _split4(tl.load(xw + W))
        isum = _dp4a(l0, xe0, _dp4a(h0, xo0, _dp4a(l1, xe1, _dp4a(h1, xo1, zero, False), False), False), False)
        isum = _dp4a(l2, xe2, _dp4a(h2, xo2, _dp4a(l3, xe3, _dp4a(h3, xo3, isum, False), False), False), False)
    else:
        w0, w1, w2, w3 = _split4(w)
        x0, x1, x2, x3 = _split4(tl.load(xw))
        isum = _dp4a(w0, x0, _dp4a(w1, x1, _dp4a(w2, x2, _dp4a(w3, x3, zero, True), True), True), True)
    dx = tl.load(XSm + j)  # [1, C]
    p = isum.to(tl.float32) * dx  # Σ u·x̂ a chunk
    if ROW_SCALE:
        if KIND == 1 and SYM:
            p -= 8.0 * tl.load(XSm + j + 1)  # q = u - 8
        acc += p
    else:
        acc += s * p
        if OFFSETS == 1:
            acc += o * tl.load(XSm + j + 1)
    return acc


@triton.jit
def _offsets(S, Mn, XSm, ra, stride_s, NG, SYM: tl.constexpr, LOG2G: tl.constexpr, E: tl.constexpr,
             GB: tl.constexpr, BLOCK_R: tl.constexpr):
    """Σ_g o_g·Σx̂_g for one row of x against BLOCK_R grouped weight rows ([BLOCK_R] fp32): a group's
    offset o is its min (asymmetric) or -8·s (symmetric int4: q = u - 8), Σx̂_g the sum of its
    chunks' Σx̂ (XSm's odd floats).  For groups of several chunks (OFFSETS == 2): one FMA a group
    and row of x here, where in the loop it would cost one a chunk."""
    CPG: tl.constexpr = (1 << LOG2G) // (4 * E)  # chunks a group
    gs = tl.arange(0, GB)
    cs = tl.arange(0, CPG)
    out = tl.zeros([BLOCK_R], tl.float32)
    for g0 in range(0, NG, GB):
        xg = tl.sum(tl.load(XSm + 2 * ((g0 + gs)[:, None] * CPG + cs[None, :]) + 1), 1)  # [GB]
        if SYM:
            o = -8.0 * tl.load(S + ra * stride_s + (g0 + gs)[None, :]).to(tl.float32)
        else:
            o = tl.load(Mn + ra * stride_s + (g0 + gs)[None, :]).to(tl.float32)
        out += tl.sum(o * xg[None, :], 1)
    return out


@triton.jit
def _store_row(Y, acc, m, M, rows, stride_y, srow, XSm, S, Mn, ra, stride_s, NG, SYM: tl.constexpr,
               ROW_SCALE: tl.constexpr, OFFSETS: tl.constexpr, LOG2G: tl.constexpr, E: tl.constexpr,
               GB: tl.constexpr, BLOCK_R: tl.constexpr):
    """Row m of y (where m < M; XSm its chunk scales): the chunk sums of acc, times the row scales
    srow when row-scaled, plus the groups' offsets when they are added after the loop."""
    y = tl.sum(acc, 1)
    if ROW_SCALE:
        y = y * srow
    if OFFSETS == 2:
        y += _offsets(S, Mn, XSm, ra, stride_s, NG, SYM, LOG2G, E, GB, BLOCK_R)
    tl.store(Y + m * stride_y + rows, y.to(Y.dtype.element_ty), mask=rows * 0 + m < M)  # m < M as a tensor


@triton.jit
def _rows_kernel(
    XQ, XS, QW, S, Mn, Y, M, K, stride_q, stride_s, stride_y,
    KIND: tl.constexpr, LOG2G: tl.constexpr, SYM: tl.constexpr, ROW_SCALE: tl.constexpr, OFFSETS: tl.constexpr,
    MP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """BLOCK_R weight rows against the M (<= MP <= 8) rows of x: a step loads [BLOCK_R,
    BLOCK_K/E] weight words once, 4 consecutive words a thread, and each row of x's words in the
    same layout; one accumulator a row of x (unrolled: MP is 2, 4 or 8; rows at or past M
    compute on row M - 1 and are not stored)."""
    E: tl.constexpr = 8 if KIND == 1 else 4
    W: tl.constexpr = BLOCK_K // E
    C: tl.constexpr = W // 4
    NCH = K // (4 * E)  # chunks a row of x
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ra = rows.to(tl.int64)[:, None]
    c = tl.arange(0, C)
    words = tl.arange(0, W)[None, :]
    qw = QW + ra * stride_q + words
    xw0 = XQ + words + tl.zeros([BLOCK_R, 1], tl.int32)  # row 0's words, in the weights' layout
    zero = tl.zeros([BLOCK_R, C], tl.int32)
    m2 = tl.minimum(2, M - 1).to(tl.int64)
    m3 = tl.minimum(3, M - 1).to(tl.int64)
    m4 = tl.minimum(4, M - 1).to(tl.int64)
    m5 = tl.minimum(5, M - 1).to(tl.int64)
    m6 = tl.minimum(6, M - 1).to(tl.int64)
    m7 = tl.minimum(7, M - 1).to(tl.int64)
    XW = K // 4  # int32 words a row of XQ
    XR = 2 * NCH  # floats a row of XS
    a0 = tl.zeros([BLOCK_R, C], tl.float32)
    a1 = tl.zeros([BLOCK_R, C], tl.float32)
    a2 = tl.zeros([BLOCK_R, C], tl.float32)
    a3 = tl.zeros([BLOCK_R, C], tl.float32)
    a4 = tl.zeros([BLOCK_R, C], tl.float32)
    a5 = tl.zeros([BLOCK_R, C], tl.float32)
    a6 = tl.zeros([BLOCK_R, C], tl.float32)
    a7 = tl.zeros([BLOCK_R, C], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w = tl.load(qw + k0 // E)
        lo = w & 0x0F0F0F0F
        hi = (w >> 4) & 0x0F0F0F0F
        j = 2 * (k0 // (4 * E) + c)[None, :]
        o = 0.0
        if ROW_SCALE:
            s = 1.0
        else:
            gidx = ((k0 + 4 * E * c) >> LOG2G)[None, :]
            s = tl.load(S + ra * stride_s + gidx).to(tl.float32)
            if OFFSETS == 1:  # a group is one chunk: its offset here
                if SYM:
                    o = -8.0 * s
                else:
                    o = tl.load(Mn + ra * stride_s + gidx).to(tl.float32)
        xw = xw0 + k0 // 4  # int4: the step's even plane starts at word k0 / 4; int8: its words do
        a0 = _row_step(a0, w, lo, hi, xw, XS, j, s, o, zero,
                       KIND, SYM, ROW_SCALE, OFFSETS, W, C, BLOCK_R)
        a1 = _row_step(a1, w, lo, hi, xw + XW, XS + XR, j, s, o, zero,  # M >= 2
                       KIND, SYM, ROW_SCALE, OFFSETS, W, C, BLOCK_R)
        if MP > 2:
            a2 = _row_step(a2, w, lo, hi, xw + m2 * XW, XS + m2 * XR, j, s, o, zero,
                           KIND, SYM, ROW_SCALE, OFFSETS, W, C, BLOCK_R)
            a3 = _row_step(a3, w, lo, hi, xw + m3 * XW, XS + m3 * XR, j, s, o, zero,
                           KIND, SYM, ROW_SCALE, OFFSETS, W, C, BLOCK_R)
        if MP > 4:
            a4 = _row_step(a4, w, lo, hi, xw + m4 * XW, XS + m4 * XR, j, s, o, zero,
                           KIND, SYM, ROW_SCALE, OFFSETS, W, C, BLOCK_R)
            a5 = _row_step(a5, w, lo, hi, xw + m5 * XW, XS + m5 * XR, j, s, o, zero,
                           KIND, SYM, ROW_SCALE, OFFSETS, W, C, BLOCK_R)
            a6 = _row_step(a6, w, lo, hi, xw + m6 * XW, XS + m6 * XR, j, s, o, zero,
                           KIND, SYM, ROW_SCALE, OFFSETS, W, C, BLOCK_R)
            a7 = _row_step(a7, w, lo, hi, xw + m7 * XW, XS + m7 * XR, j, s, o, zero,
                           KIND, SYM, ROW_SCALE, OFFSETS, W, C, BLOCK_R)
    srow = 1.0
    if ROW_SCALE:
        srow = tl.load(S + rows.to(tl.int64) * stride_s).to(tl.float32)
    NG = K >> LOG2G  # groups a row
    GB: tl.constexpr = 32 if (BLOCK_K >> LOG2G) > 32 else BLOCK_K >> LOG2G  # groups an offset step (steps tile K)
    _store_row(Y, a0, 0, M, rows, stride_y, srow, XS, S, Mn, ra, stride_s, NG, SYM, ROW_SCALE, OFFSETS, LOG2G, E, GB,
               BLOCK_R)
    _store_row(Y, a1, 1, M, rows, stride_y, srow, XS + XR, S, Mn, ra, stride_s, NG, SYM, ROW_SCALE, OFFSETS, LOG2G, E,
               GB, BLOCK_R)
    if MP > 2:
        _store_row(Y, a2, 2, M, rows, stride_y, srow, XS + m2 * XR, S, Mn, ra, stride_s, NG, SYM, ROW_SCALE, OFFSETS,
                   LOG2G, E, GB, BLOCK_R)
        _store_row(Y, a3, 3, M, rows, stride_y, srow, XS + m3 * XR, S, Mn, ra, stride_s, NG, SYM, ROW_SCALE, OFFSETS,
                   LOG2G, E, GB, BLOCK_R)
    if MP > 4:
        _store_row(Y, a4, 4, M, rows, stride_y, srow, XS + m4 * XR, S, Mn, ra, stride_s, NG, SYM, ROW_SCALE, OFFSETS,
                   LOG2G, E, GB, BLOCK_R)
        _store_row(Y, a5, 5, M, rows, stride_y, srow, XS + m5 * XR, S, Mn, ra, stride_s, NG, SYM, ROW_SCALE, OFFSETS,
                   LOG2G, E, GB, BLOCK_R)
        _store_row(Y, a6, 6, M, rows, stride_y, srow, XS + m6 * XR, S, Mn, ra, stride_s, NG, SYM, ROW_SCALE, OFFSETS,
                   LOG2G, E, GB, BLOCK_R)
        _store_row(Y, a7, 7, M, rows, stride_y, srow, XS + m7 * XR, S, Mn, ra, stride_s, NG, SYM, ROW_SCALE, OFFSETS,
                   LOG2G, E, GB, BLOCK_R)


def offsets_mode(kind: str, group: int, symmetric: bool, row_scaled: bool) -> int:
    """Where the kernel adds the groups' offsets (mins, or -8·s for symmetric int4): 0 none
    (row-scaled, whose -8 is applied a chunk; symmetric int8), 1 in the loop (a group is one chunk
    of 4E columns), 2 after it (groups of several chunks)."""
    if row_scaled or (kind != "int4" and symmetric):
        return 0
    return 1 if group == 4 * (8 if kind == "int4" else 4) else 2


def _bucket(rows: int) -> int:
    """The row count a tuned entry is keyed on: 2, 4 or 8."""
    return max(2, triton.next_power_of_2(rows))


def applies(w, rows: int, cfg: Config | None) -> bool:
    """Whether ``cfg`` can run ``rows`` rows of x against ``w``: where the one-row GEMV's int32
    words apply (quant_gemv.words_apply: int4 / int8, groups of whole chunks or one scale a row,
    contiguous rows of whole words), with whole steps and whole row blocks."""
    if cfg is None or not 2 <= rows <= MAX_ROWS:
        return False
    return (QG.words_apply(w, QG.Config(cfg.block_r, cfg.block_k, words=3)) and w.in_features % cfg.block_k == 0
            and w.out_features % cfg.block_r == 0)


def tuned_config(w, rows: int, device: torch.device) -> Config | None:
    """This GPU's tuned "rows" tile for ``w`` at ``rows`` rows where one exists and applies, and
    the weight lets its activations be rounded to int8 (the engine's int8_activations switch)."""
    if device.type != "cuda" or not getattr(w, "int8_activations", True):
        return None
    t = lookup("rows", w, _bucket(rows), device)
    cfg = Config(*t) if t is not None else None
    return cfg if applies(w, rows, cfg) else None


def prepare(x: torch.Tensor, w, block_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] as int8 activations for ``block_k``-column steps: (XQ [M, K/4] int32 words,
    XS [M, 2·K/4E] fp32 (dx, Σ x̂) a chunk)."""
    M, K = x.shape
    E = 8 if w.fmt.kind == "int4" else 4
    block = min(1024, K)
    while K % block:
        block //= 2
    xq = torch.empty((M, K // 4), dtype=torch.int32, device=x.device)
    xs = torch.empty((M, 2 * (K // (4 * E))), dtype=torch.float32, device=x.device)
    _prep_rows_kernel[(K // block, M)](x, xq, xs, K, x.stride(0), E=E, BK=block_k, BLOCK=block, num_warps=4)
    return xq, xs


def matmul(x: torch.Tensor, w, config: Config, out_dtype=None) -> torch.Tensor:
    """x [M, K] (2 <= M <= 8) @ Wᵀ -> [M, N] in out_dtype (default x's), over x rounded to int8
    per chunk (module docstring)."""
    M, K = x.shape
    assert K == w.in_features and applies(w, M, config), f"{w.fmt.label()}: {config} does not apply"
    if x.stride(-1) != 1:
        x = x.contiguous()
    xq, xs = prepare(x, w, config.block_k)
    N = w.out_features
    y = torch.empty((M, N), dtype=out_dtype or x.dtype, device=x.device)
    row_scale = QG.row_scaled(w)
    _rows_kernel[(N // config.block_r,)](
        xq, xs, w.qweight.view(torch.int32), w.scales, w.mins if w.mins is not None else w.scales, y, M, K,
        w.qweight.stride(0) // 4, w.scales.stride(0), y.stride(0),
        KIND=1 if w.fmt.kind == "int4" else 0, LOG2G=0 if row_scale else w.group.bit_length() - 1,
        SYM=w.mins is None, ROW_SCALE=row_scale, OFFSETS=offsets_mode(w.fmt.kind, w.group, w.mins is None, row_scale),
        MP=_bucket(M), BLOCK_R=config.block_r, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages)
    return y
