"""Scatter the new tokens' K and V into the paged KV pool.

Math: k_cache[loc[t]] = k[t], v_cache[loc[t]] = v[t] for every new token t (cast to the
cache dtype).  k/v may be strided views (slices of the fused qkv projection).

Floor: streaming, 4·T·Hkv·D·elem bytes (read k, v; write two cache rows per token).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(
    KC, VC, Loc, K, V,
    stride_kct, stride_kch, stride_vct, stride_vch,
    stride_kt, stride_kh, stride_vt, stride_vh,
    H, D,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(Loc + t).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (h[:, None] < H) & (d[None, :] < D)
    k = tl.load(K + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
    v = tl.load(V + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    tl.store(KC + slot * stride_kct + h[:, None] * stride_kch + d[None, :], k.to(KC.dtype.element_ty), mask=mask)
    tl.store(VC + slot * stride_vct + h[:, None] * stride_vch + d[None, :], v.to(VC.dtype.element_ty), mask=mask)


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """k_cache/v_cache: [slots, Hkv, D]; loc: [T] int; k/v: [T, Hkv, D] (any strides, unit last)."""
    T, H, D = k.shape
    if T == 0:
        return
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    block_h = triton.next_power_of_2(H)
    block_d = triton.next_power_of_2(D)
    _store_kv_kernel[(T,)](
        k_cache, v_cache, loc, k, v,
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        H, D,
        BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4 if block_h * block_d >= 2048 else 2,
    )
