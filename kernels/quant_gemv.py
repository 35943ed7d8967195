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

Two variants, chosen by the tile (Config): ``words`` streams int4 / int8 as int32 words, each
nibble / byte read as a subnormal float against pre-scaled activations (quant_words.py; with
``words == 2`` the activations are prepared once by a kernel of their own instead of per row
block; ``words == 3``, the CUDA default for int4 and int8, they are prepared as int8 per 32 (int8
weights: 16) columns against dp4a, as llama.cpp's GPU kernels do); ``split_k`` cuts the plain
gemv's rows into column slices whose fp32 partials a second kernel adds (_sum_splits_kernel).
Without ``words`` the weight streams as byte tiles, group by group (quant_bytes.py).

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

from . import gemv as G
from . import l2_prefetch as L2
from .gemv import _cos_sin, _qkv_epilogue, _silu_mul
from .options import FMA
from .pdl import launch_options, wait_for_predecessor
from .quant_bytes import _qstream_groups
from .quant_tiles import lookup
from .quant_words import (PreparedRow, _qstream_prepped, _qstream_words, int8_buffers, prepare_activations,
                          values_a_word)

INT8, INT4, FP8 = 0, 1, 2
_KIND = {"int8": INT8, "int4": INT4, "fp8": FP8}


@triton.jit
def _qstream_rows(
    QW, S, Mn, stride_q, stride_s, rows_a, rows_b, X, R, G, ROut, K, K0, K1, write_res, eps,
    KIND: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr, ROW_SCALE: tl.constexpr,
    HAS_RES: tl.constexpr, NORM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
    WORDS: tl.constexpr, LOG2G: tl.constexpr, PREP: tl.constexpr = False, AHEAD: tl.constexpr = 0,
):
    """(Σ_k W[a,k]·n[k], Σ_k W[b,k]·n[k]) over columns [K0, K1) of the dequantized weight,
    n = rmsnorm(s) or s (the norm needs the whole row: K0 = 0, K1 = K): int4 as int32 words
    with WORDS (_qstream_words), over prepared activations with PREP too (X: _prep_act_kernel's
    XP, R: its XS; the norm and the residual are done; PREP == 2: int8 activations against dp4a,
    _qstream_prepped's INT8; AHEAD: its weights loaded a step ahead), else group by group
    (_qstream_groups)."""
    if PREP:
        ya, yb = _qstream_prepped(QW, S, Mn, stride_q, stride_s, rows_a, rows_b, X, R, K0, K1,
                                  KIND, LOG2G, SYM, ROW_SCALE, BLOCK_R, BLOCK_K, PREP == 2, AHEAD, PDL)
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
def _qgemv_kernel(X, XS, QW, S, Mn, Out, Part, K, N, stride_q, stride_s,
                  KIND: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr, ROW_SCALE: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
                  WORDS: tl.constexpr, LOG2G: tl.constexpr, SPLIT: tl.constexpr, PREP: tl.constexpr,
                  ATOMIC: tl.constexpr = False, AHEAD: tl.constexpr = 0):
    """Rows of program 0's axis, columns [k·K/SPLIT, (k + 1)·K/SPLIT) of program 1's axis k:
    the sums go to Out, or with SPLIT > 1 to the fp32 partials Part[k] (_sum_splits adds them),
    or with ATOMIC (SPLIT == 2) added into the zeroed fp32 Out: 0 + a + b is the same sum in
    either order, so the result does not depend on timing."""
    pid = tl.program_id(0)
    rows_a = pid * (2 * BLOCK_R) + tl.arange(0, BLOCK_R)
    rows_b = rows_a + BLOCK_R
    k_len = tl.multiple_of(K // SPLIT, BLOCK_K)  # the launcher checks it: aligned, vectorized loads
    k_lo = tl.multiple_of(tl.program_id(1) * k_len, BLOCK_K)
    ya, yb = _qstream_rows(QW, S, Mn, stride_q, stride_s, rows_a, rows_b, X, XS, X, Out, K, k_lo, k_lo + k_len,
                           0, 0.0, KIND, GROUP, SYM, ROW_SCALE, False, False, BLOCK_R, BLOCK_K, PDL, WORDS, LOG2G, PREP,
                           AHEAD)
    if SPLIT == 1:
        tl.store(Out + rows_a, ya.to(Out.dtype.element_ty))
        tl.store(Out + rows_b, yb.to(Out.dtype.element_ty))
    elif ATOMIC:
        tl.atomic_add(Out + rows_a, ya, sem="relaxed")
        tl.atomic_add(Out + rows_b, yb, sem="relaxed")
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
                          WORDS: tl.constexpr, LOG2G: tl.constexpr, PREP: tl.constexpr, AHEAD: tl.constexpr = 0):
    pid = tl.program_id(0)
    rows_a = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    g, u = _qstream_rows(QW, S, Mn, stride_q, stride_s, rows_a, rows_a + I, X, R, G, ROut, K, 0, K,
                         tl.where(pid == 0, K, 0), eps, KIND, GROUP, SYM, ROW_SCALE, True, True, BLOCK_R, BLOCK_K, PDL,
                         WORDS, LOG2G, PREP, AHEAD)
    tl.store(Out + rows_a, _silu_mul(g, u).to(Out.dtype.element_ty))


@triton.jit
def _qkv_first_block(QW, S, Mn, stride_q, stride_s, X, R, G, ROut, K, eps, res_n, pid, local, d,
                     D: tl.constexpr, KIND: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr,
                     ROW_SCALE: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                     PDL: tl.constexpr, WORDS: tl.constexpr, LOG2G: tl.constexpr, PREP: tl.constexpr,
                     AHEAD: tl.constexpr):
    """_qnorm_qkv_kernel's rows (d, d + D/2) of head ``local`` of its first (or only) weight;
    program 0 stores res_n elements of the residual."""
    rows_a = local * D + d
    ya, yb = _qstream_rows(QW, S, Mn, stride_q, stride_s, rows_a, rows_a + D // 2, X, R, G, ROut, K, 0, K,
                           tl.where(pid == 0, res_n, 0), eps, KIND, GROUP, SYM, ROW_SCALE, HAS_RES, True,
                           BLOCK_R, BLOCK_K, PDL, WORDS, LOG2G, PREP, AHEAD)
    return rows_a, ya, yb


@triton.jit
def _qnorm_qkv_kernel(
    X, R, G, ROut, QW, S, Mn, Bias, CS, Pos, Loc, Q, KC, VC,
    K, eps, stride_q, stride_s, stride_cs, stride_kct, stride_kch, stride_vct, stride_vch, head0, res_n,
    X2, R2, QW2, S2, Mn2, stride_q2, stride_s2, na, nb,
    HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr,
    KIND: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr, ROW_SCALE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr, WORDS: tl.constexpr, LOG2G: tl.constexpr,
    PREP: tl.constexpr, TWO: tl.constexpr = False, KIND2: tl.constexpr = 0, GROUP2: tl.constexpr = 1,
    SYM2: tl.constexpr = True, ROW_SCALE2: tl.constexpr = False, BLOCK_K2: tl.constexpr = 16,
    WORDS2: tl.constexpr = False, LOG2G2: tl.constexpr = 0, PREP2: tl.constexpr = False, AHEAD: tl.constexpr = 0,
):
    """Heads head0.. of W_qkv from a weight holding just their rows (the whole W_qkv when
    head0 = 0); the first block's program 0 stores res_n elements of the residual (K, or 0
    where another launch stores it).  TWO: a two-block row stack in one launch: the first nb
    programs stream the second block (format KIND2.., the heads after the first block's na
    programs' heads) from X2/R2: with PREP2 the activations the first block's preparation also
    laid out for the second's words, else the raw ones (each program norms them itself).  They
    go first: a raw second block's programs run longest, and they start in the first wave
    rather than trailing the first block's."""
    pid = tl.program_id(0)
    HALF: tl.constexpr = D // 2
    PER_HEAD: tl.constexpr = HALF // BLOCK_R
    d = (pid % PER_HEAD) * BLOCK_R + tl.arange(0, BLOCK_R)
    local = pid // PER_HEAD
    if TWO:  # (a constexpr branch: without TWO the second block's code is not compiled)
        if pid < nb:  # (nb whole heads of programs: d is the same either way)
            rows_a = local * D + d
            ya, yb = _qstream_rows(QW2, S2, Mn2, stride_q2, stride_s2, rows_a, rows_a + HALF, X2, R2, G, ROut, K, 0,
                                   K, 0, eps, KIND2, GROUP2, SYM2, ROW_SCALE2, HAS_RES, True,
                                   BLOCK_R, BLOCK_K2, PDL, WORDS2, LOG2G2, PREP2, AHEAD)
            local += na // PER_HEAD
        else:
            local = (pid - nb) // PER_HEAD
            rows_a, ya, yb = _qkv_first_block(QW, S, Mn, stride_q, stride_s, X, R, G, ROut, K, eps, res_n, pid - nb,
                                              local, d, D, KIND, GROUP, SYM, ROW_SCALE, HAS_RES, BLOCK_R, BLOCK_K, PDL,
                                              WORDS, LOG2G, PREP, AHEAD)
    else:
        rows_a, ya, yb = _qkv_first_block(QW, S, Mn, stride_q, stride_s, X, R, G, ROut, K, eps, res_n, pid, local, d,
                                          D, KIND, GROUP, SYM, ROW_SCALE, HAS_RES, BLOCK_R, BLOCK_K, PDL, WORDS, LOG2G,
                                          PREP, AHEAD)
    head = head0 + local
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
    work per weight; 3: those activations quantized to int8 per 4-word chunk and multiplied by
    dp4a (_qstream_prepped's INT8): about a third of the instructions, exact for the quantized
    activations, not for the activations themselves (the CUDA default; a weight whose
    ``int8_activations`` is False, the engine's debug switch, takes 2 instead).
    ``num_stages`` 2 or 3 with ``words`` >= 2: each step's weight words are loaded 1 or 2 steps
    ahead (_qstream_prepped's AHEAD; Triton pipelines no load that feeds no dot, so the launch
    option alone changes nothing there)."""

    block_r: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 1
    split_k: int = 1
    words: int = 0


# (BLOCK_R, BLOCK_K, warps, stages, words) where no tuned tile applies: int4 / int8 as int32 words
# over prepared activations rounded to int8 (dp4a), 512 bytes of packed weights per row and step, each
# step's words loaded a step ahead (on the H200 the words run 3-5x the byte tiles, faster still over
# int8 activations; on an H100 two stages took int4's batch 1 from 2.42 to 2.24 ms with no tuned file:
# bench/RESULTS.md, "2026-12-02 (fifth session)", "2026-12-03 (twelfth session)", "twenty-ninth
# session"); the byte tiles (128 bytes per row and step) for fp8 and where words do not apply
_CUDA_WORDS = {"int4": (8, 1024, 4, 2, 3), "int8": (8, 512, 4, 2, 3)}
_CUDA = {"int4": (8, 256, 4, 0), "int8": (8, 128, 4, 0), "fp8": (8, 128, 4, 0)}


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
    exact = not getattr(w, "int8_activations", True)  # the engine's int8_activations switch off
    if device_type == "cuda":
        t = lookup("gemv", w, 1, w.qweight.device)
        if t is not None:
            cfg = Config(*t)
            if rows_per_block % (2 * cfg.block_r) == 0 and block_k(w, cfg.block_k) == cfg.block_k \
                    and w.in_features % (cfg.block_k * max(1, cfg.split_k)) == 0:
                return cfg._replace(words=2) if exact and cfg.words == 3 else cfg
    if device_type == "cuda" and w.fmt.kind in _CUDA_WORDS:
        r, target, warps, stages, words = _CUDA_WORDS[w.fmt.kind]
        bk = block_k(w, target)
        if bk is not None:
            cfg = Config(min(r, rows_per_block), bk, warps, stages, 1, 2 if exact else words)
            if words_apply(w, cfg):
                return cfg
    r, target, warps, words = _CUDA[w.fmt.kind] if device_type == "cuda" else (4, 64, 4, 0)
    bk = block_k(w, target)
    if bk is None:
        return None
    return Config(min(r, rows_per_block), bk, warps, 1, 1, words)


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
                PREP=(2 if cfg.words == 3 else 1) if words and cfg.words >= 2 else 0,
                AHEAD=min(2, cfg.num_stages - 1) if words and cfg.words >= 2 else 0, **launch_options(device))


def _mins(w):
    return w.mins if w.mins is not None else w.scales


def _check_row(x: torch.Tensor, K: int) -> torch.Tensor:
    assert x.numel() == K, f"expected one row of {K} elements, got {tuple(x.shape)}"
    return x.reshape(K) if x.is_contiguous() else x.reshape(K).contiguous()


# ---------------------------------------------------------------------------- launchers
def gemv_supported(w, device_type: str) -> bool:
    if _blocks(w) is not None:
        return False
    cfg = default_config(w, w.out_features, device_type)
    return cfg is not None and w.out_features % (2 * cfg.block_r) == 0


# fp8 row-scaled weights through the dense GEMVs (``_dense_tiles``), which stream e4m3 faster
# than this module's byte tiles (bench/RESULTS.md, "2026-12-03 (ninth session)"); False routes
# them back to the byte tiles (the benchmarks' and tests' A/B)
DENSE_FP8 = True


def _dense_tiles(w, config, rows_per_block: int, kind: str) -> bool:
    """Whether ``w`` streams through the dense GEMVs (gemv.py) with its row scales applied to
    the sums: fp8 with one scale per row, no tile asked for, a shape they take."""
    return (DENSE_FP8 and config is None and w.fmt.kind == "fp8" and row_scaled(w) and w.qweight.stride(-1) == 1
            and G.row_scaled_fits(rows_per_block, w.in_features, w.qweight.device.type, kind))


def _row_scales(w) -> torch.Tensor:
    return w.scales.reshape(-1)


# the head of a batch-1 GEMV's weights that its activations' preparation (quant_words, a short
# launch that leaves the bus idle) prefetches into L2 with programs of its own; 0: none (an H100
# ran int4 batch 1 5 % slower with it, bench/RESULTS.md, twenty-sixth session)
PREP_PREFETCH_BYTES = 0


def _prep_spans(w, device) -> list:
    """The spans ``w``'s preparation prefetches (PREP_PREFETCH_BYTES of its packed values, where
    the engine's l2_prefetch debug switch leaves the weight's ``l2_prefetch`` on)."""
    if not PREP_PREFETCH_BYTES or not getattr(w, "l2_prefetch", True) or not L2.supported(device):
        return []
    return L2.spans([w.qweight], min(PREP_PREFETCH_BYTES, L2.span_bytes(device)))


def _fp16(w) -> bool:
    """Whether the dense GEMVs may multiply ``w``'s e4m3 values in fp16 (gemv.fp16_products; the
    engine's fp16_products debug switch sets it per weight)."""
    return getattr(w, "fp16_products", True)


def prepared_row(w, x_dtype, out_dtype=None, device=None) -> PreparedRow | None:
    """The buffers ``gemv(x, w, out_dtype, prepared=...)`` reads when its tile runs over int8
    activations (else None: the dense fp8 route, or a tile with no int8 preparation)."""
    if _blocks(w) is not None:
        return None
    N, K = w.out_features, w.in_features
    device = device or w.qweight.device
    if _dense_tiles(w, None, N, "gemv"):
        return None
    cfg = default_config(w, N, device.type)
    meta = _meta(w, cfg, device) if cfg is not None else None
    if meta is None or meta["PREP"] != 2:
        return None
    E = values_a_word(w)
    out = torch.empty((1, N), dtype=out_dtype or x_dtype, device=device)
    return PreparedRow(*int8_buffers(K, E, device), out, _atomic(cfg, 2, out.dtype), E, cfg.block_k, tile=(cfg, meta))


def _atomic(cfg: Config, prep: int, out_dtype) -> bool:
    """Two K halves into an fp32 output: added there atomically, zeroed by the preparation before,
    instead of partials and a launch to sum them."""
    return max(1, cfg.split_k) == 2 and bool(prep) and out_dtype == torch.float32


def gemv(x, w, out_dtype=None, config: Config | None = None, kind: str = "gemv", prepared: PreparedRow | None = None):
    """One row: x [1, K] -> W·x [1, N] in out_dtype (default x's); ``kind`` ("gemv" / "lm_head")
    picks the dense tile where an fp8 weight takes those (``_dense_tiles``).  An fp32 out_dtype
    saves a tile cut in two K halves its summing launch (_qgemv_kernel's ATOMIC).  ``prepared``
    (from ``prepared_row`` with the same out_dtype, default tile): its output, and its activations
    where the kernel before wrote them."""
    N, K = w.out_features, w.in_features
    if prepared is not None:  # its tile, its output
        assert config is None
        (cfg, meta), out = prepared.tile, prepared.out
    else:
        if _dense_tiles(w, config, N, kind):
            return G.gemv(x, w.qweight, out_dtype, kind=kind, scales=_row_scales(w), fp16=_fp16(w))
        cfg = config or default_config(w, N, x.device.type)
        assert cfg is not None
        meta = _meta(w, cfg, x.device)
        out = torch.empty((1, N), dtype=out_dtype or x.dtype, device=x.device)
    split = max(1, cfg.split_k)
    assert N % (2 * cfg.block_r) == 0 and K % (cfg.block_k * split) == 0
    atomic = _atomic(cfg, meta["PREP"], out.dtype)
    part = torch.empty((split, N), dtype=torch.float32, device=x.device) if split > 1 and not atomic else out
    qw, stride_q = _qweight(w, meta["WORDS"])
    xr = _check_row(x, K)
    if prepared is not None and prepared.filled:
        xp, xs = prepared.xp, prepared.xs
    else:
        xp, xs = (prepare_activations(w, xr, None, None, 0.0, None, cfg.block_k, int8=meta["PREP"] == 2,
                                      zero=out if atomic else None, prefetch=_prep_spans(w, x.device))
                  if meta["PREP"] else (xr, xr))
    _qgemv_kernel[(N // (2 * cfg.block_r), split)](
        xp, xs, qw, w.scales, _mins(w), out, part, K, N, stride_q, w.scales.stride(0), SPLIT=split, ATOMIC=atomic,
        **meta, **FMA)
    if split > 1 and not atomic:
        _sum_splits_kernel[(triton.cdiv(N, 1024),)](part, out, N, SPLIT=split, BLOCK=1024, num_warps=4,
                                                     **launch_options(x.device), **FMA)
    return out


def norm_gate_up_supported(w, device_type: str) -> bool:
    if _blocks(w) is not None:
        return False
    I = w.out_features // 2
    cfg = default_config(w, I, device_type)
    return cfg is not None and I % cfg.block_r == 0


def norm_gate_up(x, residual, norm_w, eps, w, config: Config | None = None):
    """One token: r = x + residual; returns (silu(W_g·n) * (W_u·n) [1, I], r [1, H]), n = rmsnorm(r)."""
    K = x.shape[-1]
    I = w.out_features // 2
    assert w.in_features == K
    if _dense_tiles(w, config, I, "gate_up"):
        return G.norm_gate_up(x, residual, norm_w, eps, w.qweight, scales=_row_scales(w), fp16=_fp16(w))
    cfg = config or default_config(w, I, x.device.type)
    assert cfg is not None and I % cfg.block_r == 0 and K % cfg.block_k == 0
    r_out = torch.empty(K, dtype=residual.dtype, device=x.device)
    out = torch.empty((1, I), dtype=residual.dtype, device=x.device)  # x may be a GEMV's fp32 sums
    meta = _meta(w, cfg, x.device)
    qw, stride_q = _qweight(w, meta["WORDS"])
    xr, rr = _check_row(x, K), _check_row(residual, K)
    if meta["PREP"]:
        xr, rr = prepare_activations(w, xr, rr, norm_w, eps, r_out, cfg.block_k, int8=meta["PREP"] == 2,
                                     prefetch=_prep_spans(w, x.device))
    _qnorm_gate_up_kernel[(I // cfg.block_r,)](
        xr, rr, norm_w, r_out, qw, w.scales, _mins(w), out, K, I, eps,
        stride_q, w.scales.stride(0), **meta, **FMA)
    return out, r_out.view(1, K)


def _blocks(w):
    """A row stack's blocks (the engine's RowStack, duck-typed: the kernels do not import the
    engine), else None."""
    return getattr(w, "parts", None)


def norm_qkv_supported(w, head_dim: int, rotary_dim: int, device_type: str) -> bool:
    if rotary_dim != head_dim or head_dim % 2:
        return False
    blocks = _blocks(w)
    if blocks is not None:  # every block whole heads, in a format the kernel tiles
        return all(b.out_features % head_dim == 0 and norm_qkv_supported(b, head_dim, rotary_dim, device_type)
                   for b in blocks)
    cfg = default_config(w, head_dim // 2, device_type)
    return cfg is not None and (head_dim // 2) % cfg.block_r == 0


def reads_prepared(w, rows_per_block: int, device_type: str) -> bool:
    """Whether the fused kernel of ``w`` (norm_qkv: rows_per_block = head_dim / 2; norm_gate_up:
    its intermediate size) reads its activations only through the preparation kernel, which takes
    them in any float dtype: then the GEMV before it may hand over fp32 sums (gemv's out_dtype)."""
    if _blocks(w) is not None or not hasattr(w, "fmt"):  # a row stack, a dense weight
        return False
    cfg = default_config(w, rows_per_block, device_type)  # (fp8's dense-tile GEMVs: words 0)
    return cfg is not None and cfg.words >= 2 and words_apply(w, cfg)


def _pair_configs(blocks, D: int, K: int, device_type: str) -> tuple[Config, Config] | None:
    """Tiles for a two-block stack in one launch: the first block's own, and the second's with
    the first's row block and warps; over prepared activations (words 2, or int8 ones: 3) only
    where the first block's are prepared the same way (one preparation lays them out for both).
    None where that does not tile (one launch per block)."""
    if len(blocks) != 2:
        return None
    c1, c2 = (default_config(b, D // 2, device_type) for b in blocks)
    if c1 is None or c2 is None or (D // 2) % c1.block_r or K % c1.block_k:
        return None
    prepared = c1.words >= 2 and words_apply(blocks[0], c1)  # the second block takes the same preparation
    c2 = Config(c1.block_r, c2.block_k, c1.num_warps, 1, 1, c1.words if prepared and c2.words >= 2 else min(c2.words, 1))
    return (c1, c2) if K % c2.block_k == 0 else None


def norm_qkv(x, residual, norm_w, eps, w, bias, cos_sin, positions, loc, k_cache, v_cache,
             num_heads: int, num_kv_heads: int, config: Config | None = None):
    """gemv.norm_qkv over a quantized W_qkv: returns (q [1, Hq, D], r [1, H]); k and v are
    in the pool at loc[0].  A row stack (e.g. q/k in int4, v in int8) of two blocks is one
    launch (_pair_configs); of more, one launch per block, each over its own heads, the first
    storing the residual."""
    K = x.shape[-1]
    D = k_cache.shape[-1]
    N = w.out_features
    assert N == (num_heads + 2 * num_kv_heads) * D and w.in_features == K
    blocks = _blocks(w)
    if blocks is None and _dense_tiles(w, config, D // 2, "qkv"):
        return G.norm_qkv(x, residual, norm_w, eps, w.qweight, bias, cos_sin, positions, loc, k_cache, v_cache,
                          num_heads, num_kv_heads, scales=_row_scales(w), fp16=_fp16(w))
    assert cos_sin.shape[-1] == D and cos_sin.dtype == torch.float32 and cos_sin.stride(-1) == 1
    xr = _check_row(x, K)
    has_res = residual is not None
    if has_res:
        rr = _check_row(residual, K)
        r_out = torch.empty(K, dtype=residual.dtype, device=x.device)
    else:
        rr = r_out = xr
    # the model's dtype: x may be a GEMV's fp32 sums (reads_prepared)
    q = torch.empty((1, num_heads, D), dtype=residual.dtype if has_res else x.dtype, device=x.device)
    pair = _pair_configs(blocks, D, K, x.device.type) if blocks is not None and config is None else None
    # one launch per weight: the whole W_qkv, a pair's first block (the second joins its launch),
    # or each block of a longer stack
    launches = [w] if blocks is None else blocks[:1] if pair is not None else blocks
    head0 = 0
    for b in launches:
        cfg = pair[0] if pair is not None else config or default_config(b, D // 2, x.device.type)
        assert cfg is not None and (D // 2) % cfg.block_r == 0 and K % cfg.block_k == 0 and b.out_features % D == 0
        meta = _meta(b, cfg, x.device)
        qw, stride_q = _qweight(b, meta["WORDS"])
        na = b.out_features // cfg.block_r // 2  # the first block's programs
        rows, b2, qw2, stride_q2 = b.out_features, b, qw, stride_q  # the second block's arguments: unused alone
        m2 = None
        if pair is not None:  # the second block in the same launch, its programs first (with the
            # first block's AHEAD: one launch)
            b2, m2 = blocks[1], _meta(blocks[1], pair[1], x.device)
            assert m2["PREP"] in (0, meta["PREP"])  # _pair_configs: one preparation, of one kind
            qw2, stride_q2 = _qweight(b2, m2["WORDS"])
            meta.update(TWO=True, KIND2=m2["KIND"], GROUP2=m2["GROUP"], SYM2=m2["SYM"], ROW_SCALE2=m2["ROW_SCALE"],
                        BLOCK_K2=m2["BLOCK_K"], WORDS2=m2["WORDS"], LOG2G2=m2["LOG2G"], PREP2=m2["PREP"])
            rows += b2.out_features
        xk, rk, x2, r2 = xr, rr, xr, rr
        if meta["PREP"]:  # a later block's prep stores the same residual again
            prep = prepare_activations(b, xr, rr if has_res else None, norm_w, eps, r_out if has_res else None,
                                       cfg.block_k, (b2, m2["BLOCK_K"]) if m2 is not None and m2["PREP"] else None,
                                       int8=meta["PREP"] == 2, prefetch=_prep_spans(b, x.device))
            xk, rk = prep[:2]
            x2, r2 = prep[2:] if len(prep) == 4 else (xr, rr)
        nb = (rows - b.out_features) // cfg.block_r // 2  # the second block's programs (0 alone)
        _qnorm_qkv_kernel[(rows // cfg.block_r // 2,)](
            xk, rk, norm_w, r_out, qw, b.scales, _mins(b), bias if bias is not None else b.scales, cos_sin,
            positions, loc, q, k_cache, v_cache,
            K, eps, stride_q, b.scales.stride(0), cos_sin.stride(0), k_cache.stride(0), k_cache.stride(1),
            v_cache.stride(0), v_cache.stride(1), head0, K if head0 == 0 else 0,
            x2, r2, qw2, b2.scales, _mins(b2), stride_q2, b2.scales.stride(0), na, nb,
            HQ=num_heads, HKV=num_kv_heads, D=D, HAS_RES=has_res, HAS_BIAS=bias is not None, **meta, **FMA)
        head0 += rows // D
    return q, r_out.view(1, K)
