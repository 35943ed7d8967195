"""The batch-1 layer tail as one launch: o_proj → (add + RMSNorm + gate/up + SiLU·mul) →
down_proj → (add + RMSNorm + the next layer's qkv + rotary + KV store), stage by stage.

Why: at batch 1 every GEMV is a separate kernel, and each kernel boundary costs a few µs in
which the memory system idles (the last programs drain, the next kernel launches and
ramps up).  Measured on an H200 (scripts/probe_gemv.py): the four fused streams of
kernels/gemv.py reach 3.8 TB/s over a Llama-3-8B layer stack while one large GEMV (the LM
head) reaches 4.45 TB/s — about 4 µs lost per boundary, 0.5 ms per token.

How: one grid holds the programs of every stage, in stage order.  Each program takes a
ticket from an atomic counter at its start and works as the ticket's program, not its
block index; a program therefore only ever waits for programs with smaller tickets, which
are already running (or done), so waiting cannot deadlock whatever order the hardware
starts blocks in.  A program of stage s > 0 first loads its first weight tile (that load
does not depend on the previous stage), then spins until the done-counter of stage s − 1
reaches that stage's program count, then streams the rest.  Producers store their outputs,
barrier, and bump their stage's done-counter with release semantics; consumers read the
counter with acquire semantics and load the produced vectors past L1 (``.cg``).  The
counters (one int32 row of four per layer) are zeroed once per forward by the caller, so
every launch starts from zero and a failed launch cannot poison the next one.  Under the
Triton interpreter programs run one after another in ticket order and the waits pass at
once.

Math per stage: the same as kernels/gemv.py (fp32 accumulation, RMSNorm scale applied
once per row block, rounding of each output once).  Floor: the weight bytes of the four
streams over copy bandwidth.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gemv import Config, default_config

_SPIN_CAP = tl.constexpr(1 << 22)  # polls before a waiting program gives up (never reached unless a bug)


@triton.jit
def _signal(Done):
    tl.debug_barrier()  # every thread's stores of this program precede the release
    tl.atomic_add(Done, 1, sem="release")


@triton.jit
def _wait(Done, target):
    n = tl.load(Done, volatile=True)
    i = 0
    while (n < target) & (i < _SPIN_CAP):
        n = tl.load(Done, volatile=True)
        i += 1
    tl.atomic_add(Done, 0, sem="acquire")  # orders this program's later loads after the producers'


@triton.jit
def _accum(acc_a, acc_b, ss, wa, wb, kk, X, R, G, ROut, write_res,
           HAS_RES: tl.constexpr, NORM: tl.constexpr, PRODUCED_X: tl.constexpr, PRODUCED_R: tl.constexpr):
    """One K-block of the row streams: acc += W[rows, kk] · n[kk] (n = s·g, or s)."""
    if PRODUCED_X:
        x = tl.load(X + kk, cache_modifier=".cg")
    else:
        x = tl.load(X + kk)
    if HAS_RES:
        if PRODUCED_R:
            r = tl.load(R + kk, cache_modifier=".cg")
        else:
            r = tl.load(R + kk)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(ROut.dtype.element_ty)
        tl.store(ROut + kk, x, mask=kk < write_res)
    xf = x.to(tl.float32)
    if NORM:
        ss += xf * xf
        xf = xf * tl.load(G + kk).to(tl.float32)
    acc_a += wa.to(tl.float32) * xf[None, :]
    acc_b += wb.to(tl.float32) * xf[None, :]
    return acc_a, acc_b, ss


@triton.jit
def _stage_rows(W, stride_w, rows_a, rows_b, X, R, G, ROut, K, write_res, eps, Done, target,
                WAIT: tl.constexpr, HAS_RES: tl.constexpr, NORM: tl.constexpr,
                PRODUCED_X: tl.constexpr, PRODUCED_R: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """(W[a]·n, W[b]·n) like gemv._stream_rows, with the first weight tile loaded before
    waiting for the producers of X (and R)."""
    offs_k = tl.arange(0, BLOCK_K)
    acc_a = tl.zeros([BLOCK_R, BLOCK_K], tl.float32)
    acc_b = tl.zeros([BLOCK_R, BLOCK_K], tl.float32)
    ss = tl.zeros([BLOCK_K], tl.float32)
    wa_ptr = W + rows_a.to(tl.int64)[:, None] * stride_w + offs_k[None, :]
    wb_ptr = W + rows_b.to(tl.int64)[:, None] * stride_w + offs_k[None, :]
    wa = tl.load(wa_ptr)
    wb = tl.load(wb_ptr)
    if WAIT:
        _wait(Done, target)
    acc_a, acc_b, ss = _accum(acc_a, acc_b, ss, wa, wb, offs_k, X, R, G, ROut, write_res,
                              HAS_RES, NORM, PRODUCED_X, PRODUCED_R)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        wa = tl.load(wa_ptr + k0)
        wb = tl.load(wb_ptr + k0)
        acc_a, acc_b, ss = _accum(acc_a, acc_b, ss, wa, wb, k0 + offs_k, X, R, G, ROut, write_res,
                                  HAS_RES, NORM, PRODUCED_X, PRODUCED_R)
    ya = tl.sum(acc_a, 1)
    yb = tl.sum(acc_b, 1)
    if NORM:
        inv = tl.rsqrt(tl.sum(ss, 0) / K + eps)
        ya = ya * inv
        yb = yb * inv
    return ya, yb


@triton.jit
def _layer_tail_kernel(
    A, Wo, Rin, G2, Wgu, Wd, G1, Wqkv, Bias, CS, Pos, Loc, KC, VC,
    Hb, Rmid, Act, Xb, Rout, Q, Cnt,
    H, QS, I, eps2, eps1,
    stride_o, stride_gu, stride_d, stride_qkv, stride_cs, stride_kct, stride_kch, stride_vct, stride_vch,
    N_O: tl.constexpr, N_GU: tl.constexpr, N_D: tl.constexpr,
    HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, HAS_QKV: tl.constexpr, HAS_BIAS: tl.constexpr,
    R_O: tl.constexpr, K_O: tl.constexpr, R_GU: tl.constexpr, K_GU: tl.constexpr,
    R_D: tl.constexpr, K_D: tl.constexpr, R_QKV: tl.constexpr, K_QKV: tl.constexpr,
):
    t = tl.atomic_add(Cnt, 1, sem="relaxed")  # ticket: this program's place in the chain
    if t < N_O:  # h = Wo · a
        rows_a = t * (2 * R_O) + tl.arange(0, R_O)
        rows_b = rows_a + R_O
        ya, yb = _stage_rows(Wo, stride_o, rows_a, rows_b, A, A, A, Hb, QS, 0, 0.0, Cnt, 0,
                             False, False, False, False, False, R_O, K_O)
        tl.store(Hb + rows_a, ya.to(Hb.dtype.element_ty))
        tl.store(Hb + rows_b, yb.to(Hb.dtype.element_ty))
        _signal(Cnt + 1)
    elif t < N_O + N_GU:  # r = h + rin; act = silu(Wg · n) * (Wu · n), n = rmsnorm(r)
        j = t - N_O
        rows_a = j * R_GU + tl.arange(0, R_GU)
        rows_b = rows_a + I
        g, u = _stage_rows(Wgu, stride_gu, rows_a, rows_b, Hb, Rin, G2, Rmid, H, tl.where(j == 0, H, 0), eps2,
                           Cnt + 1, N_O, True, True, True, True, False, R_GU, K_GU)
        tl.store(Act + rows_a, (g / (1.0 + tl.exp(-g)) * u).to(Act.dtype.element_ty))
        _signal(Cnt + 2)
    elif t < N_O + N_GU + N_D:  # x = Wd · act
        j = t - N_O - N_GU
        rows_a = j * (2 * R_D) + tl.arange(0, R_D)
        rows_b = rows_a + R_D
        ya, yb = _stage_rows(Wd, stride_d, rows_a, rows_b, Act, Act, Act, Xb, I, 0, 0.0,
                             Cnt + 2, N_GU, True, False, False, True, False, R_D, K_D)
        tl.store(Xb + rows_a, ya.to(Xb.dtype.element_ty))
        tl.store(Xb + rows_b, yb.to(Xb.dtype.element_ty))
        if HAS_QKV:
            _signal(Cnt + 3)
    elif HAS_QKV:  # the next layer's head: r' = x + r; q|k|v = Wqkv · rmsnorm(r'); rotary; KV store
        j = t - N_O - N_GU - N_D
        HALF: tl.constexpr = D // 2
        PER_HEAD: tl.constexpr = HALF // R_QKV
        head = j // PER_HEAD
        d = (j % PER_HEAD) * R_QKV + tl.arange(0, R_QKV)
        rows_a = head * D + d
        rows_b = rows_a + HALF
        ya, yb = _stage_rows(Wqkv, stride_qkv, rows_a, rows_b, Xb, Rmid, G1, Rout, H, tl.where(j == 0, H, 0), eps1,
                             Cnt + 3, N_D, True, True, True, True, True, R_QKV, K_QKV)
        if HAS_BIAS:
            ya += tl.load(Bias + rows_a).to(tl.float32)
            yb += tl.load(Bias + rows_b).to(tl.float32)
        if head < HQ + HKV:
            p = tl.load(Pos).to(tl.int64)
            c = tl.load(CS + p * stride_cs + d)
            s = tl.load(CS + p * stride_cs + HALF + d)
            ra = ya * c - yb * s
            rb = yb * c + ya * s
            if head < HQ:
                tl.store(Q + rows_a, ra.to(Q.dtype.element_ty))
                tl.store(Q + rows_b, rb.to(Q.dtype.element_ty))
            else:
                slot = tl.load(Loc).to(tl.int64)
                base = KC + slot * stride_kct + (head - HQ) * stride_kch
                tl.store(base + d, ra.to(KC.dtype.element_ty))
                tl.store(base + HALF + d, rb.to(KC.dtype.element_ty))
        else:
            slot = tl.load(Loc).to(tl.int64)
            base = VC + slot * stride_vct + (head - HQ - HKV) * stride_vch
            tl.store(base + d, ya.to(VC.dtype.element_ty))
            tl.store(base + HALF + d, yb.to(VC.dtype.element_ty))


# ---------------------------------------------------------------------------- launcher
_CUDA_WARPS = 4


def _tile(kind: str, rows_per_block: int, K: int, device_type: str) -> Config | None:
    if device_type == "cuda":  # one kernel, one warp count: 4-warp tiles for every stage
        r, bk = 4, 512
        while bk > 64 and K % bk:
            bk //= 2
        return Config(min(r, rows_per_block), bk, _CUDA_WARPS, 1) if K % bk == 0 else None
    return default_config(rows_per_block, K, device_type, kind)


def layer_tail_supported(hidden: int, q_size: int, intermediate: int, head_dim: int, device_type: str) -> bool:
    to = _tile("gemv", hidden, q_size, device_type)
    tg = _tile("gate_up", intermediate, hidden, device_type)
    td = _tile("gemv", hidden, intermediate, device_type)
    tq = _tile("qkv", head_dim // 2, hidden, device_type)
    return (None not in (to, tg, td, tq) and hidden % (2 * to.block_r) == 0 and intermediate % tg.block_r == 0
            and hidden % (2 * td.block_r) == 0 and (head_dim // 2) % tq.block_r == 0)


def layer_tail(a, residual, w_o, ln2_w, ln2_eps, w_gate_up, w_down, counters, nxt=None):
    """One token, one launch: h = W_o·a; r = h + residual; act = silu·mul of W_gu·rmsnorm(r);
    x = W_d·act.  With ``nxt`` = (ln1_w, ln1_eps, w_qkv, bias, cos_sin, positions, loc,
    k_cache, v_cache, num_heads, num_kv_heads) of the next layer it also runs that layer's
    norm_qkv on (x, r) and returns (q [1, Hq, D], r' [1, H]); without, (x [1, H], r [1, H]).
    ``counters``: a zeroed int32 tensor of 4 elements, used by this launch only."""
    H = residual.shape[-1]
    QS = a.numel()
    I = w_gate_up.shape[0] // 2
    dev = a.device
    dt = a.dtype
    to = _tile("gemv", H, QS, dev.type)
    tg = _tile("gate_up", I, H, dev.type)
    td = _tile("gemv", H, I, dev.type)
    assert w_o.shape == (H, QS) and w_gate_up.shape == (2 * I, H) and w_down.shape == (H, I)
    assert w_o.stride(1) == 1 and w_gate_up.stride(1) == 1 and w_down.stride(1) == 1
    assert counters.dtype == torch.int32 and counters.numel() >= 4
    n_o, n_gu, n_d = H // (2 * to.block_r), I // tg.block_r, H // (2 * td.block_r)
    hb = torch.empty(H, dtype=dt, device=dev)
    r_mid = torch.empty(H, dtype=residual.dtype, device=dev)
    act = torch.empty(I, dtype=dt, device=dev)
    xb = torch.empty(H, dtype=dt, device=dev)
    a = a.reshape(QS)
    rin = residual.reshape(H)
    if nxt is not None:
        ln1_w, ln1_eps, w_qkv, bias, cos_sin, positions, loc, k_cache, v_cache, hq, hkv = nxt
        D = k_cache.shape[-1]
        tq = _tile("qkv", D // 2, H, dev.type)
        n_qkv = w_qkv.shape[0] // tq.block_r // 2
        assert w_qkv.shape == ((hq + 2 * hkv) * D, H) and w_qkv.stride(1) == 1
        r_out = torch.empty(H, dtype=residual.dtype, device=dev)
        q = torch.empty((1, hq, D), dtype=dt, device=dev)
        qkv_args = (ln1_w, w_qkv, bias if bias is not None else w_qkv, cos_sin, positions, loc, k_cache, v_cache)
        strides = (w_qkv.stride(0), cos_sin.stride(0), k_cache.stride(0), k_cache.stride(1),
                   v_cache.stride(0), v_cache.stride(1))
        has_bias = bias is not None
    else:
        hq = hkv = 1
        D = 2
        tq = Config(1, to.block_k)
        n_qkv = 0
        r_out = q = xb  # unused
        ln1_eps = 0.0
        qkv_args = (ln2_w, w_o, w_o, ln2_w, counters, counters, w_o, w_o)
        strides = (0, 0, 0, 0, 0, 0)
        has_bias = False
    grid = (n_o + n_gu + n_d + n_qkv,)
    ln1_w_, w_qkv_, bias_, cs_, pos_, loc_, kc_, vc_ = qkv_args
    _layer_tail_kernel[grid](
        a, w_o, rin, ln2_w, w_gate_up, w_down, ln1_w_, w_qkv_, bias_, cs_, pos_, loc_, kc_, vc_,
        hb, r_mid, act, xb, r_out, q, counters,
        H, QS, I, ln2_eps, ln1_eps,
        w_o.stride(0), w_gate_up.stride(0), w_down.stride(0), *strides,
        N_O=n_o, N_GU=n_gu, N_D=n_d, HQ=hq, HKV=hkv, D=D, HAS_QKV=nxt is not None, HAS_BIAS=has_bias,
        R_O=to.block_r, K_O=to.block_k, R_GU=tg.block_r, K_GU=tg.block_k,
        R_D=td.block_r, K_D=td.block_k, R_QKV=tq.block_r, K_QKV=tq.block_k,
        num_warps=_CUDA_WARPS if dev.type == "cuda" else 4, num_stages=1,
    )
    if nxt is not None:
        return q, r_out.view(1, H)
    return xb.view(1, H), r_mid.view(1, H)
