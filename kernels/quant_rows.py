"""y = x Wᵀ for a few rows of x (2..8: decode batches of a few requests) over int4 / int8
weights: the weight streamed once, as the one-row GEMV streams it, each word multiplied
against every row's int8 activations by ``dp4a``.

Why: above one row the quantized matmul otherwise runs the 16-row GEMM tile (quant_gemm),
which dequantizes every weight into a tensor-core dot whose other 8..14 rows are padding; on
an H200 its int4 g128 tiles run at 2.5-3x their byte floor at 16 rows (bench/RESULTS.md,
"2026-12-04 (sixteenth session)"), and a 2-row step costs what a 16-row one does.  Here a
weight word costs the same unpacking as at one row (two ANDs and a shift for 8 int4 weights)
plus two ``dp4a`` per row of x, so up to 8 rows stay near the weights' byte floor if the loads
keep enough bytes in flight.

Math (as quant_words' ``words == 3`` GEMV, row by row): each row of x is quantized per chunk of
4E columns (E = 8 int4 / 4 int8 values per int32 word), x̂ = dx·q, dx = amax / 127, by
quant_words._store_int8 into the layout the weight words pair with; a chunk contributes
s·(dx·Σ u·q − BIAS·Σ x̂) + m·Σ x̂ (u the stored value, BIAS 8 for symmetric int4, s and m its
group's scale and offset; a row-scaled weight's scale multiplies the row's sum once).  Exact
for x̂ up to the fp32 scaling, which differs from x by at most dx / 2 per element.

Floor: the packed weight bytes plus scales over copy bandwidth (the activations, M·K bytes,
come from L2).  Reference: the dequantized weight times x̂ (tests/kernels/test_quant_rows.py).

Off unless this GPU's tuned file (quant_tiles.py) holds a "rows" entry with a tile for the
weight's format and K at the batch's row count (2, 4 or 8: the power of two at or above it),
its own N's or the nearest one's; scripts/probe_quant_rows.py writes a tile where the kernel beats
the GEMM tile and a null one where it does not, which is where the loop's ~5 instructions a weight
outrun the bytes (on the H200 int4 g128 gate_up at 8 rows, and the LM head, nearest it:
bench/RESULTS.md, "2026-12-04 (seventeenth session)").
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import quant_gemv as QG
from .options import FMA
from .quant_tiles import lookup
from .quant_words import _dp4a, _store_int8, _words_at, values_a_word

MAX_ROWS = 8


class Config(NamedTuple):
    block_r: int  # weight rows a program owns
    block_k: int  # columns a step (whole 4-word chunks; the activations' planes are laid out per step)
    num_warps: int = 4
    num_stages: int = 1  # 2 / 3: each step's weight words loaded 1 / 2 steps ahead (_rows_kernel's AHEAD)


@triton.jit
def _prep_rows_kernel(X, XQ, XS, K, stride_x, E: tl.constexpr, BK: tl.constexpr, BLOCK: tl.constexpr):
    """Row program_id(1) of x, columns [program_id(0)·BLOCK, +BLOCK), quantized to int8 into its
    own slice of XQ (K / 4 words a row) and XS (2·K / 4E floats a row): _store_int8's layout."""
    m = tl.program_id(1)
    col0 = tl.program_id(0) * BLOCK
    n = tl.load(X + m.to(tl.int64) * stride_x + col0 + tl.arange(0, BLOCK)).to(tl.float32)
    _store_int8(XQ + m.to(tl.int64) * (K // 4), XS + m.to(tl.int64) * (2 * (K // (4 * E))), n, col0, K, E, BK, BLOCK)


@triton.jit
def _row_step(acc, w, lo, hi, xw, XSm, j, s, mn, zero, KIND: tl.constexpr, SYM: tl.constexpr,
              ROW_SCALE: tl.constexpr, W: tl.constexpr, C: tl.constexpr, BLOCK_R: tl.constexpr):
    """acc [R, C] + one step of one row of x: its int8 words (xw: [R, W] pointers, the same for
    every weight row, so they land in the weights' layout) against the step's weight words w
    (int4: their even / odd nibbles lo, hi), 4 words (in-thread) a chunk, scaled into fp32."""
    if KIND == 1:  # the step's two planes: even columns, then odd ones
        prod = _dp4a(hi, tl.load(xw + W), _dp4a(lo, tl.load(xw), zero, False), False)
    else:
        prod = _dp4a(w, tl.load(xw), zero, True)
    dx = tl.load(XSm + j)  # [1, C]
    xs = tl.load(XSm + j + 1)
    p = tl.sum(tl.reshape(prod, [BLOCK_R, C, 4]), 2).to(tl.float32) * dx  # Σ u·x̂ a chunk
    if KIND == 1 and SYM:
        p -= 8.0 * xs  # q = u - 8
    if ROW_SCALE:
        acc += p
    else:
        acc += s * p
        if not SYM:
            acc += mn * xs
    return acc


@triton.jit
def _store_row(Y, acc, m, M, rows, stride_y, srow, ROW_SCALE: tl.constexpr):
    """Row m of y (where m < M): the chunk sums of acc, times the row scales srow when row-scaled."""
    y = tl.sum(acc, 1)
    if ROW_SCALE:
        y = y * srow
    tl.store(Y + m * stride_y + rows, y.to(Y.dtype.element_ty), mask=rows * 0 + m < M)  # m < M as a tensor


@triton.jit
def _rows_kernel(
    XQ, XS, QW, S, Mn, Y, M, K, stride_q, stride_s, stride_y,
    KIND: tl.constexpr, LOG2G: tl.constexpr, SYM: tl.constexpr, ROW_SCALE: tl.constexpr,
    MP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, AHEAD: tl.constexpr = 0,
):
    """BLOCK_R weight rows against the M (<= MP <= 8) rows of x: a step loads [BLOCK_R,
    BLOCK_K/E] weight words once, 4 consecutive words a thread, and each row of x's words in the
    same layout; one accumulator a row of x (unrolled: MP is 2, 4 or 8; rows at or past M
    compute on row M - 1 and are not stored).  AHEAD (1 or 2): each step's weight words are loaded
    that many steps before they are used, as quant_words._qstream_prepped loads them (Triton
    pipelines no load that feeds no dot, so otherwise a program waits on every step's words)."""
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
    zero = tl.zeros([BLOCK_R, W], tl.int32)
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
    if AHEAD >= 1:
        nw = _words_at(qw, 0, K, zero, E)
    if AHEAD == 2:
        mw = _words_at(qw, BLOCK_K, K, zero, E)
    for k0 in range(0, K, BLOCK_K):
        if AHEAD == 2:
            w = nw
            nw = mw
            mw = _words_at(qw, k0 + 2 * BLOCK_K, K, zero, E)
        elif AHEAD == 1:
            w = nw
            nw = _words_at(qw, k0 + BLOCK_K, K, zero, E)
        else:
            w = tl.load(qw + k0 // E)
        lo = w & 0x0F0F0F0F
        hi = (w >> 4) & 0x0F0F0F0F
        j = 2 * (k0 // (4 * E) + c)[None, :]
        if ROW_SCALE:
            s = 1.0
            mn = 0.0
        else:
            gidx = ((k0 + 4 * E * c) >> LOG2G)[None, :]
            s = tl.load(S + ra * stride_s + gidx).to(tl.float32)
            if SYM:
                mn = 0.0
            else:
                mn = tl.load(Mn + ra * stride_s + gidx).to(tl.float32)
        xw = xw0 + k0 // 4  # int4: the step's even plane starts at word k0 / 4; int8: its words do
        a0 = _row_step(a0, w, lo, hi, xw, XS, j, s, mn, zero, KIND, SYM, ROW_SCALE, W, C, BLOCK_R)
        a1 = _row_step(a1, w, lo, hi, xw + XW, XS + XR, j, s, mn, zero, KIND, SYM, ROW_SCALE, W, C, BLOCK_R)  # M >= 2
        if MP > 2:
            a2 = _row_step(a2, w, lo, hi, xw + m2 * XW, XS + m2 * XR, j, s, mn, zero, KIND, SYM, ROW_SCALE, W, C,
                           BLOCK_R)
            a3 = _row_step(a3, w, lo, hi, xw + m3 * XW, XS + m3 * XR, j, s, mn, zero, KIND, SYM, ROW_SCALE, W, C,
                           BLOCK_R)
        if MP > 4:
            a4 = _row_step(a4, w, lo, hi, xw + m4 * XW, XS + m4 * XR, j, s, mn, zero, KIND, SYM, ROW_SCALE, W, C,
                           BLOCK_R)
            a5 = _row_step(a5, w, lo, hi, xw + m5 * XW, XS + m5 * XR, j, s, mn, zero, KIND, SYM, ROW_SCALE, W, C,
                           BLOCK_R)
            a6 = _row_step(a6, w, lo, hi, xw + m6 * XW, XS + m6 * XR, j, s, mn, zero, KIND, SYM, ROW_SCALE, W, C,
                           BLOCK_R)
            a7 = _row_step(a7, w, lo, hi, xw + m7 * XW, XS + m7 * XR, j, s, mn, zero, KIND, SYM, ROW_SCALE, W, C,
                           BLOCK_R)
    srow = 1.0
    if ROW_SCALE:
        srow = tl.load(S + rows.to(tl.int64) * stride_s).to(tl.float32)
    _store_row(Y, a0, 0, M, rows, stride_y, srow, ROW_SCALE)
    _store_row(Y, a1, 1, M, rows, stride_y, srow, ROW_SCALE)
    if MP > 2:
        _store_row(Y, a2, 2, M, rows, stride_y, srow, ROW_SCALE)
        _store_row(Y, a3, 3, M, rows, stride_y, srow, ROW_SCALE)
    if MP > 4:
        _store_row(Y, a4, 4, M, rows, stride_y, srow, ROW_SCALE)
        _store_row(Y, a5, 5, M, rows, stride_y, srow, ROW_SCALE)
        _store_row(Y, a6, 6, M, rows, stride_y, srow, ROW_SCALE)
        _store_row(Y, a7, 7, M, rows, stride_y, srow, ROW_SCALE)


def _ahead(config: Config, K: int) -> int:
    """Steps ahead the weight words are loaded: num_stages - 1, at most 2 and fewer than the steps."""
    return max(0, min(2, config.num_stages - 1, K // config.block_k - 1))


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
    E = values_a_word(w)
    block = min(1024, K)
    while K % block:
        block //= 2
    xq = torch.empty((M, K // 4), dtype=torch.int32, device=x.device)
    xs = torch.empty((M, 2 * (K // (4 * E))), dtype=torch.float32, device=x.device)
    _prep_rows_kernel[(K // block, M)](x, xq, xs, K, x.stride(0), E=E, BK=block_k, BLOCK=block, num_warps=4, **FMA)
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
        SYM=w.mins is None, ROW_SCALE=row_scale, MP=_bucket(M), BLOCK_R=config.block_r, BLOCK_K=config.block_k,
        AHEAD=_ahead(config, K), num_warps=config.num_warps, num_stages=config.num_stages, **FMA)
    return y
