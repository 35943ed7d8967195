"""One-row GEMV kernels with the decode step's small ops fused in (batch-1 decode).

At batch 1 a decoder layer is a chain of weight streams with tiny element-wise ops in
between; launched one by one, those ops cost more than the bytes they move (~11 launches
a layer).  These kernels fold them into the weight stream:

  * ``norm_qkv``: r = x + residual (optional); q|k|v = W_qkv · rmsnorm(r) (+ bias);
    rotary on q and k; k and v written straight into the KV pool at ``loc``; q returned.
  * ``norm_gate_up``: r = x + residual; a = silu(W_g · rmsnorm(r)) * (W_u · rmsnorm(r)).
  * ``gemv``: y = W · x (o_proj, down_proj, LM head).

Math: with s = x (+ residual, rounded to the residual dtype like the unfused path) and
g the norm weight, rmsnorm(s) = s · g · inv, inv = rsqrt(mean(s²) + eps).  inv is one
scalar per row, so every program accumulates Σ_k W[n,k]·s[k]·g[k] and Σ_k s[k]² in the
same pass and scales at the end (fp32 throughout, one rounding of each output; e4m3 weights
in the full-K tiles multiply in fp16 under 16-bit activations, ``_dot``).

Each program owns two blocks of BLOCK_R weight rows ("a" and "b") and streams them over K:
  * qkv: a = rows d, b = rows d + D/2 of one head, the pairs the neox rotary mixes, so
    the rotation happens in registers; v heads use the same split and are stored as is;
  * gate_up: a = gate rows n, b = up rows n + I, so silu(a) · b is local;
  * plain: a and b are the two halves of 2·BLOCK_R consecutive rows.
Program 0 also writes r (the next residual) to a fresh buffer: the others still read
the old one.

Two program shapes:
  * full-K (K ≤ 8192 after rounding up to a power of two): a few persistent programs per SM;
    each normalises x once, keeps it in registers, and walks its row blocks (grid-stride)
    with one [BLOCK_R, K] weight tile per block.  x, the residual and g are read once per
    program, not once per row block.
  * K-loop (larger K, e.g. down_proj's 14336): one program per row block, streaming
    BLOCK_K columns per step.

With PDL (kernels/pdl.py, Hopper+) each kernel is launched while its predecessor drains: a
full-K program loads its first weight tile, then waits for x.  The tiles are smaller than they
would be without PDL: a successor's programs need free registers to start early.

Floor: the weight bytes N·K·elem over copy bandwidth (K-loop: x, residual and g are
re-read by every program from L2, ~2·K·elem per program against 2·BLOCK_R·K·elem of weights).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .options import FMA
from .pdl import launch_options, wait_for_predecessor
# the tiles (Config, default_config) and the fp16-products test, also part of this module's interface
from .gemv_tiles import Config, default_config, fits, fp16_products, programs, row_scaled_fits  # noqa: F401


@triton.jit
def _stream_rows(
    W, stride_w, rows_a, rows_b, X, R, G, ROut, K, write_res, eps,
    HAS_RES: tl.constexpr, NORM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):
    """(Σ_k W[a,k]·n[k], Σ_k W[b,k]·n[k]) with n = rmsnorm(s) (NORM: s·g·inv, inv applied
    once at the end) or n = s.  Waits for the predecessor kernel (PDL) before reading x.
    One BLOCK_K step in registers at a time: loading the next while multiplying these is slower
    (bench/RESULTS.md, "programmatic dependent launch")."""
    offs_k = tl.arange(0, BLOCK_K)
    acc_a = tl.zeros([BLOCK_R, BLOCK_K], tl.float32)
    acc_b = tl.zeros([BLOCK_R, BLOCK_K], tl.float32)
    ss = tl.zeros([BLOCK_K], tl.float32)
    wa_ptr = W + rows_a.to(tl.int64)[:, None] * stride_w + offs_k[None, :]
    wb_ptr = W + rows_b.to(tl.int64)[:, None] * stride_w + offs_k[None, :]
    wait_for_predecessor(PDL)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        wa = tl.load(wa_ptr + k0)
        wb = tl.load(wb_ptr + k0)
        x = tl.load(X + kk)
        if HAS_RES:
            x = (x.to(tl.float32) + tl.load(R + kk).to(tl.float32)).to(ROut.dtype.element_ty)
            tl.store(ROut + kk, x, mask=kk < write_res)
        xf = x.to(tl.float32)
        if NORM:
            ss += xf * xf
            xf = xf * tl.load(G + kk).to(tl.float32)
        acc_a += wa.to(tl.float32) * xf[None, :]
        acc_b += wb.to(tl.float32) * xf[None, :]
    ya = tl.sum(acc_a, 1)
    yb = tl.sum(acc_b, 1)
    if NORM:
        inv = tl.rsqrt(tl.sum(ss, 0) / K + eps)
        ya = ya * inv
        yb = yb * inv
    return ya, yb


@triton.jit
def _cols(K, K_PAD: tl.constexpr):
    """Full-K column offsets and mask.  When K == K_PAD the mask is a constant true, so the
    weight tiles load unmasked (vectorised; a runtime mask measured ~15% slower on gate_up)."""
    offs = tl.arange(0, K_PAD)
    if K_PAD == K:
        mask = tl.full([K_PAD], 1, tl.int1)
    else:
        mask = offs < K
    return offs, mask


@triton.jit
def _normed_x(X, R, G, ROut, K, write_res, eps, offs, mask, HAS_RES: tl.constexpr, NORM: tl.constexpr):
    """Full-K prologue: n [K_PAD] fp32 = rmsnorm(s)·g or s, s = x (+ residual); s is written
    to ROut where offs < write_res (one program does it)."""
    x = tl.load(X + offs, mask=mask, other=0.0)
    if HAS_RES:
        x = (x.to(tl.float32) + tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)).to(ROut.dtype.element_ty)
        tl.store(ROut + offs, x, mask=offs < write_res)
    n = x.to(tl.float32)
    if NORM:
        inv = tl.rsqrt(tl.sum(n * n, 0) / K + eps)
        n = n * inv * tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    return n


@triton.jit
def _tile(W, stride_w, rows, offs, mask):
    """One full-K weight tile W[rows, :K]."""
    return tl.load(W + rows.to(tl.int64)[:, None] * stride_w + offs[None, :], mask=mask[None, :], other=0.0)


@triton.jit
def _operand(n, W, X, F16: tl.constexpr):
    """The full-K tiles' x operand and the factor their sums take back: (n, 1), or with F16 for e4m3
    weights under 16-bit activations n in fp16, scaled by a power of two that puts its largest
    |value| in [4, 8) (fp32 activations keep the fp32 sums)."""
    E4M3_X16: tl.constexpr = (F16 and W.dtype.element_ty.is_fp8e4nv() and X.dtype.element_ty.primitive_bitwidth == 16
                              and n.shape[0] >= 16)  # _dot sums runs of 16
    if E4M3_X16:
        amax = tl.max(tl.abs(n), 0)
        e = tl.minimum(tl.maximum((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF, 3), 253)  # biased exponent
        up = ((256 - e) << 23).to(tl.float32, bitcast=True)  # 2^(129 - e): amax -> [4, 8)
        op = (n * up).to(tl.float16)
        xs = ((e - 2) << 23).to(tl.float32, bitcast=True)  # 2^(e - 129) = 1 / up
    else:
        op = n
        xs = 1.0
    return op, xs


@triton.jit
def _dot(w, n, xs):
    """tile · n: [BLOCK_R] fp32.  An e4m3 tile times an fp16 n (``_operand`` with F16): fp16 pairs, as
    the hardware converts e4m3, in packed FMAs, eight products a lane, then the fp32 sum (widening
    each weight to fp32 costs a conversion, a widening and an FMA a weight).  The sums of eight stay
    below 2^15 (|w| <= 448, |n| < 8) and keep 11 bits, more than the unfused path's bf16 activations."""
    E4M3_X16: tl.constexpr = w.dtype.is_fp8e4nv() and n.dtype == tl.float16
    if E4M3_X16:
        R: tl.constexpr = w.shape[0]
        KP: tl.constexpr = w.shape[1]
        p = tl.reshape(w.to(tl.float16) * n[None, :], [R, KP // 16, 8, 2])
        y = tl.sum(tl.reshape(tl.sum(p, 2).to(tl.float32), [R, KP // 8]), 1) * xs
    else:
        y = tl.sum(w.to(tl.float32) * n[None, :], 1)
    return y


@triton.jit
def _scaled(y, S, rows, ROW_SCALE: tl.constexpr):
    """y times its rows' scales (an fp8 weight's per-row scales, applied once to each sum)."""
    if ROW_SCALE:
        y = y * tl.load(S + rows).to(tl.float32)
    return y


@triton.jit
def _silu_mul(g, u):
    return g / (1.0 + tl.exp(-g)) * u


@triton.jit
def _cos_sin(CS, p, stride_cs, head, d, HQ: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr):
    """cos and sin for rows (d, d + D/2) at position p; zeros for v heads (no load)."""
    rot = d < tl.where(head < HQ + HKV, HALF, 0)  # one comparison: the interpreter rejects block & scalar masks
    c = tl.load(CS + p * stride_cs + d, mask=rot, other=0.0)
    s = tl.load(CS + p * stride_cs + HALF + d, mask=rot, other=0.0)
    return c, s


@triton.jit
def _qkv_epilogue(ya, yb, head, d, c, s, slot, Bias, Q, KC, VC, stride_kct, stride_kch,
                  stride_vct, stride_vch, HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                  HAS_BIAS: tl.constexpr):
    """Rows (d, d + D/2) of ``head``: + bias; rotary on q and k heads (c, s from _cos_sin);
    q stored, k and v written into the KV pool at ``slot``."""
    HALF: tl.constexpr = D // 2
    rows_a = head * D + d
    rows_b = rows_a + HALF
    if HAS_BIAS:
        ya += tl.load(Bias + rows_a).to(tl.float32)
        yb += tl.load(Bias + rows_b).to(tl.float32)
    if head < HQ + HKV:  # q or k: rotate the (d, d + D/2) pairs
        ra = ya * c - yb * s
        rb = yb * c + ya * s
        if head < HQ:
            tl.store(Q + rows_a, ra.to(Q.dtype.element_ty))
            tl.store(Q + rows_b, rb.to(Q.dtype.element_ty))
        else:
            base = KC + slot * stride_kct + (head - HQ) * stride_kch
            tl.store(base + d, ra.to(KC.dtype.element_ty))
            tl.store(base + HALF + d, rb.to(KC.dtype.element_ty))
    else:
        base = VC + slot * stride_vct + (head - HQ - HKV) * stride_vch
        tl.store(base + d, ya.to(VC.dtype.element_ty))
        tl.store(base + HALF + d, yb.to(VC.dtype.element_ty))


# The full-K kernels peel their first row block: its weight tile is loaded before
# wait_for_predecessor (weights are never written during a step), so with PDL that load
# overlaps the previous kernel's tail.
@triton.jit
def _qkv_rows(blk, PER_HEAD: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr):
    head = blk // PER_HEAD
    d = (blk % PER_HEAD) * BLOCK_R + tl.arange(0, BLOCK_R)
    return head, d, head * D + d


@triton.jit
def _norm_qkv_fullk_kernel(
    X, R, G, ROut, W, Bias, CS, Pos, Loc, Q, KC, VC,
    K: tl.constexpr, NB, eps, stride_w, stride_cs, stride_kct, stride_kch, stride_vct, stride_vch,
    HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
    HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, K_PAD: tl.constexpr, PDL: tl.constexpr,
    S=None, ROW_SCALE: tl.constexpr = False, F16: tl.constexpr = False,
):
    """The position and slot are loaded once per program after the wait, and each block's
    cos/sin are issued with its weight tile, off the chain that follows the dot (after the dot
    they cost ~10 %; bench/RESULTS.md, "programmatic dependent launch")."""
    pid = tl.program_id(0)
    HALF: tl.constexpr = D // 2
    PER_HEAD: tl.constexpr = HALF // BLOCK_R
    offs, mask = _cols(K, K_PAD)
    head, d, rows_a = _qkv_rows(pid, PER_HEAD, D, BLOCK_R)
    wa = _tile(W, stride_w, rows_a, offs, mask)
    wb = _tile(W, stride_w, rows_a + HALF, offs, mask)
    wait_for_predecessor(PDL)
    p = tl.load(Pos).to(tl.int64)
    slot = tl.load(Loc).to(tl.int64)
    c, s = _cos_sin(CS, p, stride_cs, head, d, HQ, HKV, HALF)
    n = _normed_x(X, R, G, ROut, K, tl.where(pid == 0, K, 0), eps, offs, mask, HAS_RES, True)
    n, xs = _operand(n, W, X, F16)
    _qkv_epilogue(_scaled(_dot(wa, n, xs), S, rows_a, ROW_SCALE), _scaled(_dot(wb, n, xs), S, rows_a + HALF, ROW_SCALE),
                  head, d, c, s, slot, Bias, Q, KC, VC, stride_kct, stride_kch, stride_vct, stride_vch, HQ, HKV, D,
                  HAS_BIAS)
    for blk in range(pid + tl.num_programs(0), NB, tl.num_programs(0)):
        head, d, rows_a = _qkv_rows(blk, PER_HEAD, D, BLOCK_R)
        wa = _tile(W, stride_w, rows_a, offs, mask)
        wb = _tile(W, stride_w, rows_a + HALF, offs, mask)
        c, s = _cos_sin(CS, p, stride_cs, head, d, HQ, HKV, HALF)
        _qkv_epilogue(_scaled(_dot(wa, n, xs), S, rows_a, ROW_SCALE),
                      _scaled(_dot(wb, n, xs), S, rows_a + HALF, ROW_SCALE),
                      head, d, c, s, slot, Bias, Q, KC, VC, stride_kct, stride_kch, stride_vct, stride_vch, HQ, HKV,
                      D, HAS_BIAS)


@triton.jit
def _norm_gate_up_fullk_kernel(X, R, G, ROut, W, Out, K: tl.constexpr, I, NB, eps, stride_w,
                               BLOCK_R: tl.constexpr, K_PAD: tl.constexpr, PDL: tl.constexpr,
                               S=None, ROW_SCALE: tl.constexpr = False, F16: tl.constexpr = False):
    pid = tl.program_id(0)
    offs, mask = _cols(K, K_PAD)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    wg = _tile(W, stride_w, rows, offs, mask)
    wu = _tile(W, stride_w, rows + I, offs, mask)
    wait_for_predecessor(PDL)
    n = _normed_x(X, R, G, ROut, K, tl.where(pid == 0, K, 0), eps, offs, mask, True, True)
    n, xs = _operand(n, W, X, F16)
    g = _scaled(_dot(wg, n, xs), S, rows, ROW_SCALE)
    tl.store(Out + rows, _silu_mul(g, _scaled(_dot(wu, n, xs), S, rows + I, ROW_SCALE)).to(Out.dtype.element_ty))
    for blk in range(pid + tl.num_programs(0), NB, tl.num_programs(0)):
        rows = blk * BLOCK_R + tl.arange(0, BLOCK_R)
        g = _scaled(_dot(_tile(W, stride_w, rows, offs, mask), n, xs), S, rows, ROW_SCALE)
        u = _scaled(_dot(_tile(W, stride_w, rows + I, offs, mask), n, xs), S, rows + I, ROW_SCALE)
        tl.store(Out + rows, _silu_mul(g, u).to(Out.dtype.element_ty))


@triton.jit
def _gemv_fullk_kernel(X, W, Out, K: tl.constexpr, NB, stride_w, BLOCK_R: tl.constexpr, K_PAD: tl.constexpr,
                       AHEAD: tl.constexpr, PDL: tl.constexpr, S=None, ROW_SCALE: tl.constexpr = False,
                       F16: tl.constexpr = False):
    """AHEAD (1 or 2) row blocks are loaded before the wait: o_proj waits on the attention,
    during which the weight stream is otherwise idle.  The loop holds one tile at a time: two
    in registers (the next loaded before each dot) run 2-4x slower over e4m3."""
    pid = tl.program_id(0)
    step = tl.num_programs(0)
    offs, mask = _cols(K, K_PAD)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    w = _tile(W, stride_w, rows, offs, mask)
    first = pid + step
    if AHEAD == 2:
        rows2 = tl.minimum(first, NB - 1) * BLOCK_R + tl.arange(0, BLOCK_R)
        w2 = _tile(W, stride_w, rows2, offs, mask)
    wait_for_predecessor(PDL)
    n = _normed_x(X, X, X, Out, K, 0, 0.0, offs, mask, False, False)
    n, xs = _operand(n, W, X, F16)
    tl.store(Out + rows, _scaled(_dot(w, n, xs), S, rows, ROW_SCALE).to(Out.dtype.element_ty))
    if AHEAD == 2:
        if first < NB:
            tl.store(Out + rows2, _scaled(_dot(w2, n, xs), S, rows2, ROW_SCALE).to(Out.dtype.element_ty))
        first += step
    for blk in range(first, NB, step):
        rows = blk * BLOCK_R + tl.arange(0, BLOCK_R)
        w = _tile(W, stride_w, rows, offs, mask)
        tl.store(Out + rows, _scaled(_dot(w, n, xs), S, rows, ROW_SCALE).to(Out.dtype.element_ty))


@triton.jit
def _norm_qkv_kernel(
    X, R, G, ROut, W, Bias, CS, Pos, Loc, Q, KC, VC,
    K, eps, stride_w, stride_cs, stride_kct, stride_kch, stride_vct, stride_vch,
    HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
    HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
    S=None, ROW_SCALE: tl.constexpr = False,
):
    pid = tl.program_id(0)
    HALF: tl.constexpr = D // 2
    PER_HEAD: tl.constexpr = HALF // BLOCK_R
    head = pid // PER_HEAD
    d = (pid % PER_HEAD) * BLOCK_R + tl.arange(0, BLOCK_R)
    rows_a = head * D + d
    rows_b = rows_a + HALF
    ya, yb = _stream_rows(W, stride_w, rows_a, rows_b, X, R, G, ROut, K, tl.where(pid == 0, K, 0), eps,
                          HAS_RES, True, BLOCK_R, BLOCK_K, PDL)
    ya = _scaled(ya, S, rows_a, ROW_SCALE)
    yb = _scaled(yb, S, rows_b, ROW_SCALE)
    c, s = _cos_sin(CS, tl.load(Pos).to(tl.int64), stride_cs, head, d, HQ, HKV, HALF)
    _qkv_epilogue(ya, yb, head, d, c, s, tl.load(Loc).to(tl.int64), Bias, Q, KC, VC,
                  stride_kct, stride_kch, stride_vct, stride_vch, HQ, HKV, D, HAS_BIAS)


@triton.jit
def _norm_gate_up_kernel(
    X, R, G, ROut, W, Out, K, I, eps, stride_w,
    HAS_RES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
    S=None, ROW_SCALE: tl.constexpr = False,
):
    pid = tl.program_id(0)
    rows_a = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rows_b = rows_a + I
    g, u = _stream_rows(W, stride_w, rows_a, rows_b, X, R, G, ROut, K, tl.where(pid == 0, K, 0), eps,
                        HAS_RES, True, BLOCK_R, BLOCK_K, PDL)
    g = _scaled(g, S, rows_a, ROW_SCALE)
    u = _scaled(u, S, rows_b, ROW_SCALE)
    tl.store(Out + rows_a, _silu_mul(g, u).to(Out.dtype.element_ty))


@triton.jit
def _gemv_kernel(X, W, Out, K, stride_w, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
                 S=None, ROW_SCALE: tl.constexpr = False):
    pid = tl.program_id(0)
    rows_a = pid * (2 * BLOCK_R) + tl.arange(0, BLOCK_R)
    rows_b = rows_a + BLOCK_R
    ya, yb = _stream_rows(W, stride_w, rows_a, rows_b, X, X, X, Out, K, 0, 0.0,
                          False, False, BLOCK_R, BLOCK_K, PDL)
    ya = _scaled(ya, S, rows_a, ROW_SCALE)
    yb = _scaled(yb, S, rows_b, ROW_SCALE)
    tl.store(Out + rows_a, ya.to(Out.dtype.element_ty))
    tl.store(Out + rows_b, yb.to(Out.dtype.element_ty))


# ---------------------------------------------------------------------------- launchers
def _row_scales(scales) -> dict:
    """The kernels' arguments for an fp8 weight's per-row scales (none without)."""
    return {} if scales is None else dict(S=scales, ROW_SCALE=True)


def _check_row(x: torch.Tensor, K: int) -> torch.Tensor:
    assert x.numel() == K, f"expected one row of {K} elements, got {tuple(x.shape)}"
    return x.reshape(K) if x.is_contiguous() else x.reshape(K).contiguous()


def norm_qkv_supported(num_heads: int, num_kv_heads: int, head_dim: int, hidden: int, rotary_dim: int,
                       device_type: str) -> bool:
    if rotary_dim != head_dim or head_dim % 2:
        return False
    cfg = default_config(head_dim // 2, hidden, device_type, "qkv")
    return cfg is not None and (head_dim // 2) % cfg.block_r == 0


def norm_qkv(x, residual, norm_w, eps, w_qkv, bias, cos_sin, positions, loc, k_cache, v_cache,
             num_heads: int, num_kv_heads: int, config: Config | None = None, scales=None, fp16: bool = True):
    """One token: x, residual [1, H] (residual may be None: first layer, r = x).
    w_qkv: [(Hq + 2 Hkv) D, H]; cos_sin: [P, D] fp32; positions, loc: [1] int;
    k_cache/v_cache: [slots, Hkv, D].  Returns (q [1, Hq, D], r [1, H]): k and v are
    already in the pool at loc[0].  ``scales`` [rows]: w_qkv is fp8 e4m3
    with one scale per row (``row_scaled_fits``); ``fp16``: whether it may multiply in fp16
    (``fp16_products``)."""
    K = x.shape[-1]
    D = k_cache.shape[-1]
    N = w_qkv.shape[0]
    assert N == (num_heads + 2 * num_kv_heads) * D and w_qkv.shape[1] == K and w_qkv.stride(1) == 1
    assert cos_sin.shape[-1] == D and cos_sin.dtype == torch.float32 and cos_sin.stride(-1) == 1
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    cfg = config or default_config(D // 2, K, x.device.type, "qkv", w_qkv.element_size())
    assert fits(cfg, K) and (D // 2) % cfg.block_r == 0
    xr = _check_row(x, K)
    has_res = residual is not None
    if has_res:
        rr = _check_row(residual, K)
        r_out = torch.empty(K, dtype=residual.dtype, device=x.device)
    else:
        rr = r_out = xr
    q = torch.empty((1, num_heads, D), dtype=x.dtype, device=x.device)
    blocks = N // cfg.block_r // 2
    args = (xr, rr, norm_w, r_out, w_qkv, bias if bias is not None else w_qkv, cos_sin, positions, loc, q,
            k_cache, v_cache)
    strides = (w_qkv.stride(0), cos_sin.stride(0), k_cache.stride(0), k_cache.stride(1),
               v_cache.stride(0), v_cache.stride(1))
    meta = dict(HQ=num_heads, HKV=num_kv_heads, D=D, HAS_RES=has_res, HAS_BIAS=bias is not None,
                BLOCK_R=cfg.block_r, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch_options(x.device))
    if cfg.programs_per_sm:
        _norm_qkv_fullk_kernel[(programs(cfg, blocks, x.device),)](
            *args, K, blocks, eps, *strides, K_PAD=triton.next_power_of_2(K),
            F16=fp16_products(cfg, K, w_qkv.dtype, x.dtype, fp16), **_row_scales(scales), **meta, **FMA)
    else:
        _norm_qkv_kernel[(blocks,)](*args, K, eps, *strides, BLOCK_K=cfg.block_k, **_row_scales(scales), **meta, **FMA)
    return q, r_out.view(1, K)


def norm_gate_up_supported(intermediate: int, hidden: int, device_type: str) -> bool:
    cfg = default_config(intermediate, hidden, device_type, "gate_up")
    return cfg is not None and intermediate % cfg.block_r == 0


def norm_gate_up(x, residual, norm_w, eps, w_gate_up, config: Config | None = None, scales=None, fp16: bool = True):
    """One token: r = x + residual; returns (silu(W_g·n) * (W_u·n) [1, I], r [1, H]),
    n = rmsnorm(r).  w_gate_up: [2I, H], gate rows first."""
    K = x.shape[-1]
    I = w_gate_up.shape[0] // 2
    assert w_gate_up.shape == (2 * I, K) and w_gate_up.stride(1) == 1
    cfg = config or default_config(I, K, x.device.type, "gate_up", w_gate_up.element_size())
    assert fits(cfg, K) and I % cfg.block_r == 0
    xr = _check_row(x, K)
    rr = _check_row(residual, K)
    r_out = torch.empty(K, dtype=residual.dtype, device=x.device)
    out = torch.empty((1, I), dtype=x.dtype, device=x.device)
    blocks = I // cfg.block_r
    meta = dict(BLOCK_R=cfg.block_r, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch_options(x.device))
    if cfg.programs_per_sm:
        _norm_gate_up_fullk_kernel[(programs(cfg, blocks, x.device),)](
            xr, rr, norm_w, r_out, w_gate_up, out, K, I, blocks, eps, w_gate_up.stride(0),
            K_PAD=triton.next_power_of_2(K), F16=fp16_products(cfg, K, w_gate_up.dtype, x.dtype, fp16),
            **_row_scales(scales), **meta, **FMA)
    else:
        _norm_gate_up_kernel[(blocks,)](
            xr, rr, norm_w, r_out, w_gate_up, out, K, I, eps, w_gate_up.stride(0),
            HAS_RES=True, BLOCK_K=cfg.block_k, **_row_scales(scales), **meta, **FMA)
    return out, r_out.view(1, K)


def gemv_supported(out_features: int, in_features: int, device_type: str, kind: str = "gemv") -> bool:
    cfg = default_config(out_features, in_features, device_type, kind)
    if cfg is None:
        return False
    return out_features % (cfg.block_r if cfg.programs_per_sm else 2 * cfg.block_r) == 0


def gemv(x, w, out_dtype=None, config: Config | None = None, kind: str = "gemv", scales=None, fp16: bool = True):
    """One row: x [1, K] -> W·x [1, N] in out_dtype (default x's).  ``kind`` picks the tile
    ("gemv" for the layer projections, "lm_head" for the vocabulary-wide one)."""
    N, K = w.shape
    assert w.stride(1) == 1
    cfg = config or default_config(N, K, x.device.type, kind, w.element_size())
    assert fits(cfg, K) and N % (cfg.block_r if cfg.programs_per_sm else 2 * cfg.block_r) == 0
    xr = _check_row(x, K)
    out = torch.empty((1, N), dtype=out_dtype or x.dtype, device=x.device)
    meta = dict(BLOCK_R=cfg.block_r, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch_options(x.device))
    if cfg.programs_per_sm:
        blocks = N // cfg.block_r
        _gemv_fullk_kernel[(programs(cfg, blocks, x.device),)](
            xr, w, out, K, blocks, w.stride(0), K_PAD=triton.next_power_of_2(K), AHEAD=cfg.ahead,
            F16=fp16_products(cfg, K, w.dtype, x.dtype, fp16), **_row_scales(scales), **meta, **FMA)
    else:
        _gemv_kernel[(N // (2 * cfg.block_r),)](xr, w, out, K, w.stride(0), BLOCK_K=cfg.block_k,
                                                 **_row_scales(scales), **meta, **FMA)
    return out


# ---------------------------------------------------------------------------- references
def _rms(s, g, eps):
    sf = s.float()
    return sf * torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + eps) * g.float()


def norm_qkv_ref(x, residual, norm_w, eps, w_qkv, bias, cos_sin, positions, num_heads, num_kv_heads):
    """Torch reference in the inputs' precision (tests pass fp64): (q, k, v [1, H*, D], r)."""
    r = x if residual is None else (x.float() + residual.float()).to(residual.dtype)
    y = _rms(r, norm_w, eps) @ w_qkv.float().t()
    if bias is not None:
        y = y + bias.float()
    D = cos_sin.shape[-1]
    q, k, v = y.split([num_heads * D, num_kv_heads * D, num_kv_heads * D], dim=-1)
    cs = cos_sin[positions.long()]
    c, s = cs[:, None, : D // 2], cs[:, None, D // 2:]

    def rot(t, h):
        t = t.view(1, h, D)
        t1, t2 = t[..., : D // 2], t[..., D // 2:]
        return torch.cat([t1 * c - t2 * s, t2 * c + t1 * s], dim=-1).to(x.dtype)

    return rot(q, num_heads), rot(k, num_kv_heads), v.view(1, num_kv_heads, D).to(x.dtype), r


def norm_gate_up_ref(x, residual, norm_w, eps, w_gate_up):
    r = (x.float() + residual.float()).to(residual.dtype)
    y = _rms(r, norm_w, eps) @ w_gate_up.float().t()
    i = y.shape[-1] // 2
    return (torch.nn.functional.silu(y[:, :i]) * y[:, i:]).to(x.dtype), r
