"""y = x Wᵀ over a quantized W for any number of rows: weight tiles dequantized in registers
into ``tl.dot`` (tensor cores), and the entry point for every quantized matmul on the GPU.

``matmul(x, w)`` picks the route by rows:
  * 1 row: quant_gemv.gemv (the weight streamed once, no tensor cores needed);
  * 2-8 rows of int4 / int8 where this GPU's tuned file names a "rows" tile: quant_rows (the
    weight streamed once against every row's int8 activations);
  * 16-64 rows of int4 (groups of 64+) where the tuned file names an "a8" tile: quant_a8
    (int8 tensor cores over the rows rounded to int8 per group and the stored nibbles);
  * fp8 on sm90+ with more than FP8_SCALED_MM_MIN_ROWS rows: torch._scaled_mm with the rows
    quantized to e4m3 per row (dynamic scales) — fp8 tensor cores at twice the bf16 rate;
  * DEQUANT_MIN_ROWS rows or more (prefill chunks): the weight dequantized to x's dtype by
    ``dequantize`` (one pass: packed bytes in, 2 bytes per weight out), then cuBLAS — the extra
    pass costs ~10% of the matmul at 2,048 rows and cuBLAS's dense tiles are the fastest there;
  * otherwise this kernel: 16-row tiles for decode batches (the dot is free next to the
    weight stream), 32/64-row tiles for larger ones.

Math: acc[m, n] = Σ_k x[m, k]·w[n, k] with w = s·q + m dequantized group by group (sub-tiles
of one group's columns, unrolled within a BLOCK_K step; the unpacking is quant_bytes.py's),
cast to x's dtype for the dot (fp32 inputs use IEEE fp32 products), accumulated in fp32; per-row
scales multiply the accumulator once.  An int4 group contributes two dots, over its even and
its odd columns (byte j holds columns 2j and 2j + 1), or with INTERLEAVE one dot over the
nibbles put back in column order (``tl.interleave``) against contiguous activations.  With
SCALE_AFTER (int4, bf16 / fp16 x) the dot runs over the stored nibbles u themselves, as the
exact 16-bit floats BIAS + u (128 + u in bf16, 1024 + u in fp16: the nibble ORed into BIAS's
mantissa), and acc += s·dot + (m − (BIAS + 8·sym)·s)·Σx per group: no float math per weight,
2·BLOCK_M FMAs per group and column; the bias costs the fp32 accumulator ~log2(BIAS/8) bits.
With WORDS the same math reads the packed bytes as int32 words: one shift and one lop3 make two
nibbles into two such floats, and each group's Σx comes from one reduction per call rather than
from every program.

With HALF_MATH (int4, bf16 / fp16 x) the weights are dequantized in x's own 16-bit float, two per
packed instruction: w = s·u + m with s and m rounded to x's dtype, one packed FMA per two weights
after the nibbles are made into exact floats (_half_nibbles): about 2.5 instructions a weight for
the byte's load and unpacking, against ~5 for the fp32 dequantization; each w is still rounded
once, as the dot's input would be.

With SPLIT > 1 the grid's second axis cuts K into slices: each program sums its slice into an
fp32 partial tile, and a second launch sums the partials in slice order into the output's dtype
(more programs where K is long and the output has few tiles).

With WIDE (grouped weights, neither SCALE_AFTER nor WORDS) a BLOCK_K step is one load of the
packed tile and one dot over all its columns, each column's scale (and offset) gathered from its
group's: for groups narrower than the step (a GGUF Q6_K part as int8 g16, Q4_K as int4 g32) in
place of a narrow load and a K = GROUP dot per group.

With SWAP_AB the program computes the transposed tile accᵀ[BLOCK_N, BLOCK_M] = w·xᵀ and stores
it transposed: the dequantized weight is the dot's left operand, x (few rows) the right one.
On Hopper the left operand of wgmma may come from registers, so the dequantized tile need not
go through shared memory as the B operand does, and BLOCK_N (64 / 128) fills wgmma's 64-row
minimum while BLOCK_M (16..64) is its N, so even 16-row batches get the warpgroup MMA (the
packed bytes still pass through shared memory, read back a byte per load on sm_90).

Floor: max(packed weight bytes / copy bandwidth, 2·M·N·K / the dot rate of x's dtype); the
dequantization costs a few ALU ops per weight per M-tile.  Reference: layers/quant.py
``matmul_ref`` (dequantize, then x @ Wᵀ).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .options import FMA
from .quant_bytes import group_params, nibbles
from .quant_gemv import _KIND, _sum_splits_kernel, row_scaled
from .quant_tiles import lookup_entry

FP8_SCALED_MM_MIN_ROWS = 16
DEQUANT_MIN_ROWS = 1024
DEQUANT_MAX_BYTES = 512 << 20  # dequant_matmul's dense copy at most (the memory plan counts it)
# the bits of the smallest 16-bit float whose step is 1 (128 in bf16, 1024 in fp16): OR-ing a
# nibble u into them gives 128 + u / 1024 + u exactly
_BIAS_BITS = {torch.bfloat16: 0x4300, torch.float16: 0x6400}


@triton.jit
def _dot(x, w, acc, SWAP_AB: tl.constexpr, PREC: tl.constexpr):
    """acc + x·wᵀ ([rows, n]), or with SWAP_AB acc + w·xᵀ ([n, rows]: w the left operand)."""
    if SWAP_AB:
        acc = tl.dot(w, tl.trans(x), acc, input_precision=PREC)
    else:
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PREC)
    return acc


@triton.jit
def _scales(S, Mn, rows, stride_s, k0, cols, GROUP: tl.constexpr, SYM: tl.constexpr, WIDE: tl.constexpr):
    """Scale and offset of the weights of ``rows`` at columns k0 + cols, as tiles that broadcast
    over them: [R, 1] of the one group they lie in, or with WIDE [R, C] gathered per column."""
    if WIDE:
        off = rows.to(tl.int64)[:, None] * stride_s + ((k0 + cols) // GROUP)[None, :]
        s = tl.load(S + off).to(tl.float32)
        if SYM:
            m = tl.zeros_like(s)
        else:
            m = tl.load(Mn + off).to(tl.float32)
    else:
        s1, m1 = group_params(S, Mn, rows, stride_s, k0 // GROUP, SYM)
        s = s1[:, None]
        m = m1[:, None]
    return s, m


@triton.jit
def _along(v, DIM: tl.constexpr):
    """Vector v laid along dimension DIM of a 2-D tile (broadcast along the other)."""
    if DIM == 0:
        r = v[:, None]
    else:
        r = v[None, :]
    return r


@triton.jit
def _word_pair(w, SHIFT: tl.constexpr, BIAS_BITS: tl.constexpr, DT: tl.constexpr, ASM: tl.constexpr):
    """Nibbles SHIFT/4 and SHIFT/4 + 4 of each int32 word w (columns 8i + t and 8i + t + 4 of a
    row) as the 16-bit floats BIAS + u: one shift and one AND-OR per two weights, the result's
    halves read as the two values (ASM: PTX on the GPU; elsewhere the same bits by integer ops)."""
    if ASM:  # lop3 lut 0xEA: (a & b) | c, with b = 0x000F000F and c = BIAS in both halves
        if BIAS_BITS == 0x4300:
            lo, hi = tl.inline_asm_elementwise(
                "{ .reg .b32 t; lop3.b32 t, $2, 0x000F000F, 0x43004300, 0xEA; mov.b32 {$0, $1}, t; }",
                "=h,=h,r", [w >> SHIFT], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=1)
        else:
            lo, hi = tl.inline_asm_elementwise(
                "{ .reg .b32 t; lop3.b32 t, $2, 0x000F000F, 0x64006400, 0xEA; mov.b32 {$0, $1}, t; }",
                "=h,=h,r", [w >> SHIFT], dtype=(tl.float16, tl.float16), is_pure=True, pack=1)
    else:
        lo = (((w >> SHIFT) & 0xF) | BIAS_BITS).to(tl.uint16).to(DT, bitcast=True)
        hi = (((w >> (SHIFT + 16)) & 0xF) | BIAS_BITS).to(tl.uint16).to(DT, bitcast=True)
    return lo, hi


@triton.jit
def _word_columns(w, BIAS_BITS: tl.constexpr, DT: tl.constexpr, ASM: tl.constexpr):
    """[R, W] int32 words of int4 pairs -> [R, 8·W] 16-bit floats BIAS + u in column order (word
    i holds columns 8i..8i+7, nibble t at bits 4t).  The joins keep each word's eight values in
    its thread: the innermost pairs the values 4 columns apart, the outermost neighbours."""
    c0, c4 = _word_pair(w, 0, BIAS_BITS, DT, ASM)
    c1, c5 = _word_pair(w, 4, BIAS_BITS, DT, ASM)
    c2, c6 = _word_pair(w, 8, BIAS_BITS, DT, ASM)
    c3, c7 = _word_pair(w, 12, BIAS_BITS, DT, ASM)
    even = tl.join(tl.join(c0, c4), tl.join(c2, c6))
    odd = tl.join(tl.join(c1, c5), tl.join(c3, c7))
    v = tl.join(even, odd)  # [R, W, 2, 2, 2]: column 8i + 4·a + 2·b + c at [r, i, a, b, c]
    return tl.reshape(v, [w.shape[0], w.shape[1] * 8])


def _half_nibbles_asm(kind: str, one: int, bias: int) -> str:
    """_half_nibbles' PTX for one 16-bit float kind (bf16 / f16): ``one`` its 1.0 and ``bias``
    its BIAS, as bits."""
    pair = lambda v: f"0x{v:04X}{v:04X}"  # noqa: E731  (the value in both halves of a register)
    return ("{ .reg .b32 t, one, neg; "
            f"mov.b32 one, {pair(one)}; mov.b32 neg, {pair(bias | 0x8000)}; mad.lo.u32 t, $2, 4097, 0; "
            f"lop3.b32 t, t, 0x000F000F, {pair(bias)}, 0xEA; fma.rn.{kind}x2 t, t, one, neg; "
            f"fma.rn.{kind}x2 t, t, $3, $4; mov.b32 {{$0, $1}}, t; }}")


_HALF_NIBBLES_BF16 = tl.constexpr(_half_nibbles_asm("bf16", 0x3F80, 0x4300))
_HALF_NIBBLES_FP16 = tl.constexpr(_half_nibbles_asm("f16", 0x3C00, 0x6400))


@triton.jit
def _pair_bits(v, DT: tl.constexpr):
    """fp32 [R] -> int32 [R, 1] holding v rounded to the 16-bit float DT in both halves (an
    operand of the packed x2 instructions)."""
    h = v.to(DT).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return (h | (h << 16))[:, None]


@triton.jit
def _half_nibbles(b, s, m, SYM: tl.constexpr, BIAS_BITS: tl.constexpr, DT: tl.constexpr, ASM: tl.constexpr):
    """Bytes b [R, C] of int4 pairs -> (s·q_lo + m, s·q_hi + m) [R, C] in x's 16-bit float DT,
    q = u (− 8 when symmetric), s and m [R] of the group rounded to DT.  On the GPU four packed
    instructions per byte, two weights: a multiply-add puts the high nibble 12 bits up, a lop3
    ORs both nibbles into the mantissas of BIAS (128 in bf16, 1024 in fp16: BIAS + u exactly),
    a packed FMA by 1 and −BIAS leaves u exactly (sm_80's form of a packed bf16 subtract), and a
    packed FMA gives s·u + m rounded once.
    Elsewhere the same values by fp32 math rounded to DT (the interpreter has no PTX)."""
    sd = s.to(DT).to(tl.float32)
    if SYM:
        md = -8.0 * sd  # exact: a power-of-two multiple of a DT value
    else:
        md = m.to(DT).to(tl.float32)
    if ASM:
        sp = tl.broadcast_to(_pair_bits(sd, DT), b.shape)
        mp = tl.broadcast_to(_pair_bits(md, DT), b.shape)
        args = [b.to(tl.int32), sp, mp]
        if BIAS_BITS == 0x4300:
            lo, hi = tl.inline_asm_elementwise(_HALF_NIBBLES_BF16, "=h,=h,r,r,r", args,
                                               dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=1)
        else:
            lo, hi = tl.inline_asm_elementwise(_HALF_NIBBLES_FP16, "=h,=h,r,r,r", args,
                                               dtype=(tl.float16, tl.float16), is_pure=True, pack=1)
    else:
        bi = b.to(tl.int32)
        lo = ((bi & 0xF).to(tl.float32) * sd[:, None] + md[:, None]).to(DT)
        hi = ((bi >> 4).to(tl.float32) * sd[:, None] + md[:, None]).to(DT)
    return lo, hi


@triton.jit
def _qgemm_kernel(
    X, QW, S, Mn, Y, XS, M, N, K, stride_xm, stride_q, stride_s, stride_ym, stride_xs,
    KIND: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr, ROW_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PREC: tl.constexpr, INTERLEAVE: tl.constexpr, SCALE_AFTER: tl.constexpr = False, BIAS_BITS: tl.constexpr = 0,
    SWAP_AB: tl.constexpr = False, WORDS: tl.constexpr = False, ASM: tl.constexpr = False,
    SPLIT: tl.constexpr = 1, WIDE: tl.constexpr = False, HALF_MATH: tl.constexpr = False,
):
    pid = tl.program_id(0)
    # split-K: program (pid, pid_k) sums columns [k_lo, k_lo + K / SPLIT) into its own fp32 slab of Y
    pid_k = tl.program_id(1)
    k_lo = pid_k * (K // SPLIT)
    k_hi = k_lo + K // SPLIT
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n  # consecutive programs share a band of GROUP_M row tiles (L2 reuse of W)
    first_m = (pid // per_group) * GROUP_M
    rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows_in_group
    pid_n = (pid % per_group) // rows_in_group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, N - 1)  # clamped: the weight loads need no mask
    mask_m = offs_m < M
    xrow = X + offs_m.to(tl.int64)[:, None] * stride_xm
    wrow = QW + rows.to(tl.int64)[:, None] * stride_q
    if SWAP_AB:  # accᵀ: the weight tile is the dot's left operand
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    ND: tl.constexpr = 0 if SWAP_AB else 1  # the accumulator's dimension along n
    # columns per dot: those sharing one scale, or the whole step (row scales; WIDE: each column's
    # group scale gathered, so one wide load and one dot per step for groups narrower than it)
    SUB: tl.constexpr = BLOCK_K if (ROW_SCALE or WIDE) else GROUP
    NS: tl.constexpr = BLOCK_K // SUB
    if SCALE_AFTER or WORDS:  # int4, 16-bit x, ROW_SCALE False: the stored nibbles themselves into the dot
        bias: tl.constexpr = (1024.0 if BIAS_BITS == 0x6400 else 128.0) + (8.0 if SYM else 0.0)
        offs = tl.arange(0, SUB // 8 if WORDS else SUB // 2)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            for j in tl.static_range(NS):
                kj = k0 + j * SUB
                x = tl.load(xrow + (kj + tl.arange(0, SUB))[None, :], mask=mask_m[:, None], other=0.0)
                # BIAS + u exactly, as x's 16-bit float: the nibble ORed into the mantissa of BIAS
                if WORDS:  # QW read as int32 words (stride_q in words)
                    wq = _word_columns(tl.load(wrow + (kj // 8 + offs)[None, :]), BIAS_BITS, x.dtype, ASM)
                else:
                    b = tl.load(wrow + (kj // 2 + offs)[None, :]).to(tl.uint16)
                    wq = tl.interleave(((b & 0xF) | BIAS_BITS).to(x.dtype, bitcast=True),
                                       ((b >> 4) | BIAS_BITS).to(x.dtype, bitcast=True))
                d = _dot(x, wq, None, SWAP_AB, PREC)
                s, m = group_params(S, Mn, rows, stride_s, kj // GROUP, SYM)
                # Σ x·w = s·Σ x·(BIAS + u) + (m - (BIAS + 8·sym)·s)·Σ x; WORDS takes Σ x from XS
                if WORDS:
                    xs = tl.load(XS + offs_m.to(tl.int64) * stride_xs + kj // GROUP, mask=mask_m, other=0.0)
                else:
                    xs = tl.sum(x.to(tl.float32), 1)
                acc += d * _along(s, ND) + _along(xs, 1 - ND) * _along(m - bias * s, ND)
    elif KIND == 1 and HALF_MATH:  # int4 dequantized in x's 16-bit float, two at a time, in column order
        offs = tl.arange(0, SUB // 2)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            for j in tl.static_range(NS):
                kj = k0 + j * SUB
                s, m = group_params(S, Mn, rows, stride_s, kj // GROUP, SYM)
                x = tl.load(xrow + (kj + tl.arange(0, SUB))[None, :], mask=mask_m[:, None], other=0.0)
                lo, hi = _half_nibbles(tl.load(wrow + (kj // 2 + offs)[None, :]), s, m, SYM, BIAS_BITS, x.dtype, ASM)
                acc = _dot(x, tl.interleave(lo, hi), acc, SWAP_AB, PREC)
    elif KIND == 1:  # int4
        HALF: tl.constexpr = SUB // 2
        offs = tl.arange(0, HALF)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            for j in tl.static_range(NS):
                kj = k0 + j * SUB
                lo, hi = nibbles(tl.load(wrow + (kj // 2 + offs)[None, :]), SYM)
                s, m = _scales(S, Mn, rows, stride_s, kj, 2 * offs, GROUP, SYM, WIDE)
                we = lo * s + m
                wo = hi * s + m
                if INTERLEAVE:
                    x = tl.load(xrow + (kj + tl.arange(0, SUB))[None, :], mask=mask_m[:, None], other=0.0)
                    w = tl.interleave(we.to(x.dtype), wo.to(x.dtype))
                    acc = _dot(x, w, acc, SWAP_AB, PREC)
                else:
                    xe = tl.load(xrow + (kj + 2 * offs)[None, :], mask=mask_m[:, None], other=0.0)
                    xo = tl.load(xrow + (kj + 2 * offs + 1)[None, :], mask=mask_m[:, None], other=0.0)
                    acc = _dot(xe, we.to(xe.dtype), acc, SWAP_AB, PREC)
                    acc = _dot(xo, wo.to(xo.dtype), acc, SWAP_AB, PREC)
    else:
        offs = tl.arange(0, SUB)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            for j in tl.static_range(NS):
                kj = k0 + j * SUB
                w = tl.load(wrow + (kj + offs)[None, :]).to(tl.float32)
                if not ROW_SCALE:
                    s, m = _scales(S, Mn, rows, stride_s, kj, offs, GROUP, SYM, WIDE)
                    w = w * s + m
                x = tl.load(xrow + (kj + offs)[None, :], mask=mask_m[:, None], other=0.0)
                acc = _dot(x, w.to(x.dtype), acc, SWAP_AB, PREC)
    if SWAP_AB:
        acc = tl.trans(acc)
    if ROW_SCALE:
        acc = acc * tl.load(S + rows.to(tl.int64) * stride_s).to(tl.float32)[None, :]
    y = Y + pid_k.to(tl.int64) * M * stride_ym + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y, acc.to(Y.dtype.element_ty), mask=mask_m[:, None] & (offs_n < N)[None, :])


class Config(NamedTuple):
    block_m: int
    block_n: int
    block_k: int  # target; the launcher takes the largest power of two <= it that tiles K and the groups
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8
    interleave: int = 0  # int4: one dot per group over the nibbles in column order
    # int4 with bf16 / fp16 x (else ignored): each group's dot runs over the stored nibbles u as
    # the exact 16-bit floats BIAS + u (the nibble ORed into BIAS's mantissa: one integer op per
    # weight, no float math), and its result is scaled into the accumulator afterwards,
    # acc += s·dot + (m - (BIAS + 8·sym)·s)·Σx — 2·BLOCK_M FMAs per group and column instead of
    # dequantizing every weight; for few rows and groups of 64 or more
    scale_after: int = 0
    # the transposed tile accᵀ = w·xᵀ, the dequantized weight the dot's left operand (module
    # docstring); BLOCK_M (>= 16) is then the dot's N, BLOCK_N (64 / 128) its M
    swap_ab: int = 0
    # int4 with bf16 / fp16 x: scale_after's math with the packed bytes read as int32 words,
    # two nibbles made into two 16-bit floats by one shift and one AND-OR (``_word_columns``)
    words: int = 0
    # K cut into this many slices, one program each, their fp32 partial tiles summed in a fixed
    # order afterwards: more programs for long K and few output tiles (down_proj: K = 14,336,
    # 128 tiles of 32x64 at 64 rows on a 132-SM H200); 1 where K / split_k does not tile
    split_k: int = 1
    # grouped weights (int8 / fp8 / int4 without scale_after or words): each BLOCK_K step is one
    # wide load and one dot, each column's scale gathered, instead of a load and a dot per group
    # (a Q6_K part as int8 g16: 16-byte rows and K = 16 dots otherwise)
    wide: int = 0
    # int4 with bf16 / fp16 x, neither scale_after nor words (else ignored): the weights
    # dequantized in x's 16-bit float, two per packed instruction (``_half_nibbles``: 2.5 ops a
    # weight, where the fp32 dequantization takes ~5), the group's scale and offset rounded to x's
    # dtype first
    half_math: int = 0


def tuned_rows(rows: int) -> int | None:
    """The row count a tuned entry for ``rows`` rows of 16 or more is keyed on (16 or 64), as the
    GEMM's and quant_a8's probes time them; None past 64 rows, where no entry was timed."""
    return None if rows > 64 else 16 if rows <= 16 else 64


def default_config(rows: int, device_type: str, w=None) -> Config:
    """The tuned tile for ``w`` (quant_tiles.py; 16- and 64-row entries) where there is one for
    its shape; else the nearest shape's tuned tile or the built-in one (``builtin_config``),
    with K split where the output has fewer tiles than the GPU has SMs (``fill_split``)."""
    if device_type != "cuda":
        return Config(16, 16, 32, 4, 1, 4)
    if w is None:
        return builtin_config(rows, None, False)
    cfg = None
    if tuned_rows(rows) is not None:
        entry = lookup_entry("gemm", w, tuned_rows(rows), w.qweight.device)
        if entry is not None and entry[1] == w.out_features:
            return Config(*entry[0])
        cfg = Config(*entry[0]) if entry is not None else None
    cfg = cfg or builtin_config(rows, w.fmt.kind, _sm90_or_newer(w.qweight.device))
    return fill_split(cfg, rows, w, _sm_count(w.qweight.device))


def builtin_config(rows: int, kind: str | None, sm90: bool) -> Config:
    """The CUDA tile where no tuned one exists (any GPU without a tuned file), from what the
    H200's sweeps picked across shapes (bench/RESULTS.md, "2026-12-03 (eleventh session)"): int4
    with its nibbles interleaved, and on sm_90+ the swapped tile (the dequantized weight as
    wgmma's register operand) for int4 and, above 16 rows, int8.  The rest keep the plain tiles,
    which are faster for them."""
    int4 = kind == "int4"
    if rows <= 16:
        if int4:
            return Config(16, 64, 128, 4, 3, 1, interleave=1, swap_ab=int(sm90))
        return Config(16, 32, 256, 4, 4, 1)
    if rows <= 64:
        if int4 or (kind == "int8" and sm90):
            return Config(64, 64, 128, 4, 3, 4, interleave=int(int4), swap_ab=int(sm90))
        return Config(32, 64, 128, 4, 3, 4)
    return Config(64, 128, 64, 4, 3, 8, interleave=int(int4))


def fill_split(cfg: Config, rows: int, w, sms: int) -> Config:
    """``cfg`` with K cut in two (int4 / int8) where its output tiles number at most half the SMs
    and K holds 8 steps a slice: twice the programs and bytes in flight for a short output
    (o_proj, down_proj at decode batch sizes).  On the H200 splitting makes down_proj's 64
    built-in tiles 1.3-1.8x faster (int4 g128 at 16 rows excepted) and gate_up's 448 tiles
    slower (bench/RESULTS.md, "2026-12-03 (eleventh session)")."""
    from .quant_gemv import block_k

    if cfg.split_k > 1 or w.fmt.kind not in ("int4", "int8"):
        return cfg
    tiles = triton.cdiv(rows, cfg.block_m) * triton.cdiv(w.out_features, cfg.block_n)
    bk = block_k(w, cfg.block_k)
    if 2 * tiles <= sms and bk is not None and w.in_features % (2 * bk) == 0 and w.in_features // (2 * bk) >= 8:
        return cfg._replace(split_k=2)
    return cfg


@functools.lru_cache(maxsize=None)
def _sm90_or_newer(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def gemm(x: torch.Tensor, w, config: Config | None = None, out_dtype=None) -> torch.Tensor:
    """x [M, K] (bf16 / fp16 / fp32) @ Wᵀ -> [M, N] in out_dtype (default x's) by the kernel."""
    from .quant_gemv import block_k

    M, K = x.shape
    N = w.out_features
    assert K == w.in_features
    cfg = config or default_config(M, x.device.type, w)
    bk = block_k(w, cfg.block_k)
    assert bk is not None, f"{w.fmt.label()}: K={K} does not tile"
    if x.stride(-1) != 1:
        x = x.contiguous()
    split = max(1, cfg.split_k)
    if K % (split * bk):
        split = 1
    y = torch.empty((M, N), dtype=out_dtype or x.dtype, device=x.device)
    # split-K: the programs write fp32 partials [split, M, N], summed after in slice order
    out = y if split == 1 else torch.empty((split, M, N), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n), split)
    scale_after = bool(cfg.scale_after) and w.fmt.kind == "int4" and x.dtype in _BIAS_BITS
    words = (bool(cfg.words) and w.fmt.kind == "int4" and x.dtype in _BIAS_BITS and not row_scaled(w)
             and w.qweight.is_contiguous() and K % 8 == 0 and w.group >= 32)
    qw, stride_q = (w.qweight.view(torch.int32), w.qweight.stride(0) // 4) if words else (w.qweight, w.qweight.stride(0))
    half_math = bool(cfg.half_math) and w.fmt.kind == "int4" and x.dtype in _BIAS_BITS and not (scale_after or words)
    bias_bits = _BIAS_BITS.get(x.dtype, 0) if (scale_after or words or half_math) else 0
    # the words loop takes each group's Σx from here: one small reduction per call, where every
    # program summing its own copy costs as much as the unpacking (one add per weight at 64 rows)
    xs = torch.sum(x.unflatten(1, (K // w.group, w.group)), dim=-1, dtype=torch.float32) if words else y
    _qgemm_kernel[grid](
        x, qw, w.scales, w.mins if w.mins is not None else w.scales, out, xs, M, N, K,
        x.stride(0), stride_q, w.scales.stride(0), N if split > 1 else y.stride(0), xs.stride(0),
        KIND=_KIND[w.fmt.kind], GROUP=w.group, SYM=w.mins is None, ROW_SCALE=row_scaled(w),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=bk, GROUP_M=cfg.group_m,
        PREC="ieee" if x.dtype == torch.float32 else "tf32", INTERLEAVE=bool(cfg.interleave),
        SCALE_AFTER=scale_after, BIAS_BITS=bias_bits, SWAP_AB=bool(cfg.swap_ab), WORDS=words,
        ASM=(words or half_math) and x.device.type == "cuda", SPLIT=split,
        WIDE=bool(cfg.wide) and not (scale_after or words or half_math), HALF_MATH=half_math,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **FMA)
    if split > 1:  # one launch sums the slices in order into y's dtype
        _sum_splits_kernel[(triton.cdiv(M * N, 1024),)](out, y, M * N, SPLIT=split, BLOCK=1024, PDL=False,
                                                         num_warps=4, **FMA)
    return y


@triton.jit
def _dequant_kernel(QW, S, Mn, Out, N, K, stride_q, stride_s, stride_o,
                    KIND: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Out[n, k] = s[n, k/G]·q[n, k] (+ m[n, k/G]) for one [BLOCK_N, BLOCK_K] tile (BLOCK_K
    columns of whole groups or within one group)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    mask = (rows < N)[:, None]
    out = Out + rows.to(tl.int64)[:, None] * stride_o
    r64 = tl.minimum(rows, N - 1).to(tl.int64)[:, None]  # clamped: the loads need no mask
    if KIND == 1:
        offs = tl.arange(0, BLOCK_K // 2)
        lo, hi = nibbles(tl.load(QW + r64 * stride_q + (k0 // 2 + offs)[None, :]), SYM)
        gi = (k0 + 2 * offs) // GROUP
        s = tl.load(S + r64 * stride_s + gi[None, :]).to(tl.float32)
        we = lo * s
        wo = hi * s
        if not SYM:
            m = tl.load(Mn + r64 * stride_s + gi[None, :]).to(tl.float32)
            we += m
            wo += m
        w = tl.interleave(we, wo)
        tl.store(out + (k0 + tl.arange(0, BLOCK_K))[None, :], w.to(Out.dtype.element_ty), mask=mask)
    else:
        offs = k0 + tl.arange(0, BLOCK_K)
        q = tl.load(QW + r64 * stride_q + offs[None, :]).to(tl.float32)
        gi = offs // GROUP
        s = tl.load(S + r64 * stride_s + gi[None, :]).to(tl.float32)
        w = q * s
        if not SYM:
            w += tl.load(Mn + r64 * stride_s + gi[None, :]).to(tl.float32)
        tl.store(out + offs[None, :], w.to(Out.dtype.element_ty), mask=mask)


def dequantize(w, dtype: torch.dtype, rows: slice | None = None) -> torch.Tensor:
    """Dense [N, K] (or rows ``rows``, a step-1 slice) of W in ``dtype``: the values of
    QuantizedWeight.dequantize, computed in fp32 the same way, rounded once."""
    start, stop = (0, w.out_features) if rows is None else (rows.start or 0, rows.stop)
    n, K = stop - start, w.in_features
    bk = 256
    while K % bk:
        bk //= 2
    assert bk >= 16, f"K={K} does not tile"
    out = torch.empty((n, K), dtype=dtype, device=w.qweight.device)
    qw = w.qweight[start:stop]
    sc = w.scales[start:stop]
    mn = w.mins[start:stop] if w.mins is not None else sc
    _dequant_kernel[(triton.cdiv(n, 32), K // bk)](
        qw, sc, mn, out, n, K, qw.stride(0), sc.stride(0), out.stride(0),
        KIND=_KIND[w.fmt.kind], GROUP=w.group, SYM=w.mins is None, BLOCK_N=32, BLOCK_K=bk, num_warps=4, **FMA)
    return out


def dequant_matmul(x: torch.Tensor, w, max_bytes: int = DEQUANT_MAX_BYTES) -> torch.Tensor:
    """x @ dequantize(W)ᵀ through cuBLAS, the dense copy made ``max_bytes`` at a time."""
    row_bytes = w.in_features * x.element_size()
    step = max(128, max_bytes // row_bytes)
    if step >= w.out_features:
        return torch.nn.functional.linear(x, dequantize(w, x.dtype))
    return torch.cat([torch.nn.functional.linear(x, dequantize(w, x.dtype, slice(r, min(r + step, w.out_features))))
                      for r in range(0, w.out_features, step)], dim=-1)


def supported(w) -> bool:
    from .quant_gemv import block_k

    return block_k(w, 64) is not None


# ---------------------------------------------------------------------------- dispatch
_SCALED_MM_OK: dict = {}


def fp8_native(device: torch.device) -> bool:
    """fp8 e4m3 tensor cores with row-wise scales through torch._scaled_mm (sm90+), checked once."""
    key = device.index if device.index is not None else torch.cuda.current_device()
    ok = _SCALED_MM_OK.get(key)
    if ok is None:
        ok = torch.cuda.get_device_capability(key) >= (9, 0) and hasattr(torch, "_scaled_mm")
        _SCALED_MM_OK[key] = ok
    return ok


def scaled_mm_fp8(x: torch.Tensor, w) -> torch.Tensor:
    """x rows quantized to e4m3 with one scale each (fp8_rows.py: one kernel), times the fp8
    weight with its per-row scales, on fp8 tensor cores; the result in x's dtype."""
    from .fp8_rows import quantize_rows

    xq, xs = quantize_rows(x if x.stride(-1) == 1 else x.contiguous())
    ws = w.scales.float().reshape(1, -1)
    return torch._scaled_mm(xq, w.qweight.t(), scale_a=xs, scale_b=ws, out_dtype=x.dtype)


def matmul(x: torch.Tensor, w) -> torch.Tensor:
    """x [M, K] @ Wᵀ on the GPU by the route for its row count (module docstring)."""
    from . import quant_a8, quant_gemv, quant_rows

    M, K = x.shape
    if w.fmt.kind == "fp8" and torch.cuda.get_device_capability(x.device) < (8, 9):
        from localsgl.engine.layers.quant import matmul_ref  # Triton converts e4m3 from sm89 on

        return matmul_ref(x, w)
    if M == 1 and quant_gemv.gemv_supported(w, x.device.type):
        return quant_gemv.gemv(x, w)
    if 2 <= M <= quant_rows.MAX_ROWS and x.dtype in (torch.bfloat16, torch.float16, torch.float32):
        cfg = quant_rows.tuned_config(w, M, x.device)
        if cfg is not None:
            return quant_rows.matmul(x, w, cfg)
    if 16 <= M <= 64 and x.dtype in (torch.bfloat16, torch.float16, torch.float32):
        cfg = quant_a8.tuned_config(w, M, x.device)
        if cfg is not None:
            return quant_a8.matmul(x, w, cfg)
    if (w.fmt.kind == "fp8" and M > FP8_SCALED_MM_MIN_ROWS and row_scaled(w) and fp8_native(x.device)
            and K % 16 == 0 and w.out_features % 16 == 0 and x.dtype in (torch.bfloat16, torch.float16)):
        try:
            return scaled_mm_fp8(x, w)
        except RuntimeError:  # a torch/driver without row-wise scaled mm: the kernel from now on
            _SCALED_MM_OK[x.device.index if x.device.index is not None else torch.cuda.current_device()] = False
    if M >= DEQUANT_MIN_ROWS and x.dtype in (torch.bfloat16, torch.float16) and K % 16 == 0:
        return dequant_matmul(x, w)
    if supported(w):
        return gemm(x, w)
    from localsgl.engine.layers.quant import matmul_ref

    return matmul_ref(x, w)
