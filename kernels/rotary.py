"""Rotary position embedding, neox ("rotate half") layout, applied in place.

Math: for a token at position p, with c = cos_sin[p, :R/2], s = cos_sin[p, R/2:]
(R = rotary width = cos_sin.shape[1] <= head_dim; Llama-3 scaling is already folded in),
every head vector x = [x1 | x2 | rest] (x1, x2 of width R/2) becomes
    [x1·c − x2·s | x2·c + x1·s | rest]        (fp32, rounded once).
q and k may be strided views of the fused qkv output; they are rotated in place and
returned.  Every position must lie in the table (0 <= p < P = cos_sin.shape[0]): the caller
guarantees it (the engine sizes the table from max_model_len and no request reaches that
position).  The kernel asserts it under TRITON_DEBUG=1, and the wrapper checks positions
that live on the host; on the GPU a check would cost a synchronisation per launch.

Floor: streaming, 2·T·(Hq+Hkv)·R·elem bytes (read + write q and k) plus T·R·4 bytes of
cos/sin; ~6 FLOPs per element.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .options import FMA


@triton.jit
def _rotate(X, t, pos_c, pos_s, stride_t, stride_h, H, half, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_HALF)
    mask = (h[:, None] < H) & (d[None, :] < half)
    base = X + t * stride_t + h[:, None] * stride_h + d[None, :]
    x1 = tl.load(base, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + half, mask=mask, other=0.0).to(tl.float32)
    o1 = x1 * pos_c[None, :] - x2 * pos_s[None, :]
    o2 = x2 * pos_c[None, :] + x1 * pos_s[None, :]
    tl.store(base, o1.to(X.dtype.element_ty), mask=mask)
    tl.store(base + half, o2.to(X.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    Q, K, Pos, CS,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cs,
    HQ, HK, half, P,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    p = tl.load(Pos + t).to(tl.int64)
    tl.device_assert((p >= 0) & (p < P), "rotary position outside the cos/sin table")
    d = tl.arange(0, BLOCK_HALF)
    dm = d < half
    c = tl.load(CS + p * stride_cs + d, mask=dm, other=0.0)
    s = tl.load(CS + p * stride_cs + half + d, mask=dm, other=0.0)
    _rotate(Q, t, c, s, stride_qt, stride_qh, HQ, half, BLOCK_HQ, BLOCK_HALF)
    _rotate(K, t, c, s, stride_kt, stride_kh, HK, half, BLOCK_HK, BLOCK_HALF)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor):
    """q: [T, Hq, D], k: [T, Hkv, D] (unit last stride, else copied); positions: [T] int;
    cos_sin: [P, R] fp32.  Rotates in place and returns (q, k)."""
    T, HQ, D = q.shape
    HK = k.shape[1]
    R = cos_sin.shape[-1]
    assert R % 2 == 0 and R <= D, "rotary width must be even and <= head_dim"
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if cos_sin.stride(-1) != 1 or cos_sin.dtype != torch.float32:
        cos_sin = cos_sin.float().contiguous()
    if T == 0:
        return q, k
    if not positions.is_cuda and (int(positions.min()) < 0 or int(positions.max()) >= cos_sin.shape[0]):
        raise IndexError(f"rotary positions must lie in [0, {cos_sin.shape[0]}) (the cos/sin table)")
    half = R // 2
    bhq, bhk, bhalf = triton.next_power_of_2(HQ), triton.next_power_of_2(HK), triton.next_power_of_2(half)
    _rotary_kernel[(T,)](
        q, k, positions, cos_sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin.stride(0),
        HQ, HK, half, cos_sin.shape[0],
        BLOCK_HQ=bhq, BLOCK_HK=bhk, BLOCK_HALF=bhalf,
        num_warps=4 if bhq * bhalf >= 1024 else 2,
        **FMA,
    )
    return q, k
