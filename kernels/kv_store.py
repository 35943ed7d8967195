"""Scatter the new tokens' K and V into the paged KV pool.

Math: k_cache[loc[t]] = k[t], v_cache[loc[t]] = v[t] for every new token t (cast to the
cache dtype).  k/v may be strided views (slices of the fused qkv projection).
An FP8 pool (e4m3 cache, k_scale / v_scale [Hkv, slots] fp32) stores, per token t and KV head h,
    s = max(amax_d |x[t, h, d]|, MIN_SCALE) / 448,   cache[loc[t], h] = e4m3(clamp(x[t, h] / s)),
    scale[h, loc[t]] = s
(the torch reference is localsgl.engine.kv_pool.fp8_quantize_rows).  The rounding to e4m3 is
done in fp32 arithmetic (round to nearest even, exact), so the final conversion only
re-encodes a representable value: the results are the same bits on the GPU and under the
Triton interpreter, whose own fp32 -> e4m3 conversion rounds ties away from zero and does not
carry a rounded-up mantissa into the exponent (1.95 -> 1.0).

Floor: streaming, 4·T·Hkv·D·elem bytes (read k, v; write two cache rows per token); FP8
writes D + 4 bytes per row instead of D·elem.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .options import FMA

FP8_MAX = tl.constexpr(448.0)
FP8_MIN_SCALE = tl.constexpr(1e-12)


@triton.jit
def _round_to_e4m3(x):
    """fp32 x (|x| <= 448) rounded to the nearest e4m3 value, ties to even, still in fp32:
    adding c = 1.5 · 2^(E + 20), whose fp32 step is x's e4m3 step 2^(E - 3) (E: x's
    exponent, at least -6, where e4m3's subnormals keep the smallest normal's step), rounds
    away every finer bit.  x's sign is put back afterwards, so a tiny negative x rounds to -0
    as the cast does (x + c - c alone gives +0)."""
    bits = x.to(tl.int32, bitcast=True)
    e = (bits >> 23) & 0xFF  # biased exponent
    e = tl.maximum(e, 127 - 6)
    c = (((e + 20) << 23) | 0x400000).to(tl.float32, bitcast=True)
    r = (x + c) - c
    return (r.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)


@triton.jit
def _fp8_rows(x):
    """(e4m3-rounded values in fp32, per-row scale) of a [H, D] tile."""
    xf = x.to(tl.float32)
    # div_rn: IEEE-rounded division, as torch divides (plain `/` compiles to an approximate one)
    s = tl.maximum(tl.math.div_rn(tl.max(tl.abs(xf), 1), FP8_MAX), FP8_MIN_SCALE)
    return _round_to_e4m3(tl.clamp(tl.math.div_rn(xf, s[:, None]), -FP8_MAX, FP8_MAX)), s


@triton.jit
def _store_kv_kernel(
    KC, VC, KS, VS, Loc, K, V,
    stride_kct, stride_kch, stride_vct, stride_vch, stride_ksh, stride_vsh,
    stride_kt, stride_kh, stride_vt, stride_vh,
    H, D,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, FP8: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(Loc + t).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (h[:, None] < H) & (d[None, :] < D)
    k = tl.load(K + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask, other=0.0)
    v = tl.load(V + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask, other=0.0)
    if FP8:
        k, ks = _fp8_rows(k)
        v, vs = _fp8_rows(v)
    tl.store(KC + slot * stride_kct + h[:, None] * stride_kch + d[None, :], k.to(KC.dtype.element_ty), mask=mask)
    tl.store(VC + slot * stride_vct + h[:, None] * stride_vch + d[None, :], v.to(VC.dtype.element_ty), mask=mask)
    if FP8:
        tl.store(KS + h * stride_ksh + slot, ks, mask=h < H)
        tl.store(VS + h * stride_vsh + slot, vs, mask=h < H)


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> None:
    """k_cache/v_cache: [slots, Hkv, D]; loc: [T] int; k/v: [T, Hkv, D] (any strides, unit last).
    With k_scale/v_scale ([Hkv, slots] fp32, unit last stride) the caches are e4m3 and the
    rows are quantized as the module docstring says."""
    T, H, D = k.shape
    if T == 0:
        return
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    fp8 = k_scale is not None
    if fp8:
        assert v_scale is not None and k_scale.stride(-1) == 1 and v_scale.stride(-1) == 1
        assert k_cache.dtype == torch.float8_e4m3fn and v_cache.dtype == torch.float8_e4m3fn
    else:
        k_scale = v_scale = k_cache  # unused
    block_h = triton.next_power_of_2(H)
    block_d = triton.next_power_of_2(D)
    _store_kv_kernel[(T,)](
        k_cache, v_cache, k_scale, v_scale, loc, k, v,
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        k_scale.stride(0) if fp8 else 0, v_scale.stride(0) if fp8 else 0,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        H, D,
        BLOCK_H=block_h, BLOCK_D=block_d, FP8=fp8, num_warps=4 if block_h * block_d >= 2048 else 2,
        **FMA,
    )
