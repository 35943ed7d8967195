"""RMSNorm and fused residual-add + RMSNorm.

Math (per row x of length H, fp32 throughout, one rounding at the end):
    rmsnorm(x)            = x * rsqrt(mean(x^2) + eps) * w
    fused_add_rmsnorm:      r = x + residual  (rounded to the residual dtype, as the
                            unfused torch path rounds it);  returns (rmsnorm(r), r).
3-D input [T, heads, D] (Qwen3 q/k norm) is normalised over the last dim by viewing it
as [T*heads, D].

Floor: pure streaming.  rmsnorm moves 2·T·H·elem bytes (read x, write y); the fused
form moves 4·T·H·elem (read x and residual, write r and y).  FLOPs (~4·T·H) are
negligible, so the bound is bytes / copy bandwidth.  Each program owns BLOCK_R whole
rows, so a row is loaded once and kept in registers (H <= MAX_FUSED_H); wider rows
fall back to a two-pass loop that re-reads the row (from L2).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .options import FMA

MAX_FUSED_H = 16384  # rows up to this width stay in registers


@triton.jit
def _rmsnorm_kernel(
    X, R, W, Y, ROut,
    n_rows, H,
    stride_x, stride_r, stride_y, stride_ro,
    eps,
    HAS_RES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, SINGLE: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rows < n_rows
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    if SINGLE:
        mask = mask_r[:, None] & (cols[None, :] < H)
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            r = tl.load(R + rows64[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            s = (x + r).to(ROut.dtype.element_ty)
            tl.store(ROut + rows64[:, None] * stride_ro + cols[None, :], s, mask=mask)
            x = s.to(tl.float32)
        inv = tl.rsqrt(tl.sum(x * x, 1) / H + eps)
        w = tl.load(W + cols, mask=cols < H, other=0.0).to(tl.float32)
        y = x * inv[:, None] * w[None, :]
        tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK_R], tl.float32)
        for c0 in range(0, H, BLOCK_H):
            cc = c0 + cols
            mask = mask_r[:, None] & (cc[None, :] < H)
            x = tl.load(X + rows64[:, None] * stride_x + cc[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_RES:
                r = tl.load(R + rows64[:, None] * stride_r + cc[None, :], mask=mask, other=0.0).to(tl.float32)
                s = (x + r).to(ROut.dtype.element_ty)
                tl.store(ROut + rows64[:, None] * stride_ro + cc[None, :], s, mask=mask)
                x = s.to(tl.float32)
            acc += tl.sum(x * x, 1)
        inv = tl.rsqrt(acc / H + eps)
        for c0 in range(0, H, BLOCK_H):
            cc = c0 + cols
            mask = mask_r[:, None] & (cc[None, :] < H)
            if HAS_RES:  # the summed row was written to ROut above; read it back
                x = tl.load(ROut + rows64[:, None] * stride_ro + cc[None, :], mask=mask, other=0.0).to(tl.float32)
            else:
                x = tl.load(X + rows64[:, None] * stride_x + cc[None, :], mask=mask, other=0.0).to(tl.float32)
            w = tl.load(W + cc, mask=cc < H, other=0.0).to(tl.float32)
            y = x * inv[:, None] * w[None, :]
            tl.store(Y + rows64[:, None] * stride_y + cc[None, :], y.to(Y.dtype.element_ty), mask=mask)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """View x as [rows, H] with unit stride along H (copying only if it must)."""
    if x.dim() != 2:
        x = x.reshape(-1, x.shape[-1])
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x


def _config(H: int):
    block_h = triton.next_power_of_2(H)
    single = block_h <= MAX_FUSED_H
    if not single:
        block_h = 4096
    block_r = max(1, min(64, 2048 // block_h)) if single else 1
    elems = block_r * block_h
    num_warps = 8 if elems >= 4096 else (4 if elems >= 1024 else 2)
    return block_r, block_h, single, num_warps


def _launch(x2, r2, w, y2, ro2, eps):
    n, H = x2.shape
    block_r, block_h, single, num_warps = _config(H)
    has_res = r2 is not None
    _rmsnorm_kernel[(triton.cdiv(n, block_r),)](
        x2, r2 if has_res else x2, w, y2, ro2 if has_res else y2,
        n, H,
        x2.stride(0), (r2 if has_res else x2).stride(0), y2.stride(0), (ro2 if has_res else y2).stride(0),
        eps,
        HAS_RES=has_res, BLOCK_R=block_r, BLOCK_H=block_h, SINGLE=single, num_warps=num_warps,
        **FMA,
    )


def rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., H] -> new tensor of x's shape and dtype."""
    shape = x.shape
    x2 = _as_rows(x)
    y2 = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        _launch(x2, None, w, y2, None, eps)
    return y2.view(shape)


def fused_add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor, eps: float):
    """Return (rmsnorm(x + residual), x + residual).  The new residual is written into
    ``residual``'s storage when it is a unit-stride 2-D-viewable tensor (else a new one)."""
    shape = x.shape
    x2 = _as_rows(x)
    r2 = residual.reshape(-1, shape[-1])
    in_place = r2.stride(-1) == 1 and r2.data_ptr() == residual.data_ptr() and residual.is_contiguous()
    ro2 = r2 if in_place else torch.empty(x2.shape, dtype=residual.dtype, device=x.device)
    if not in_place:
        r2 = _as_rows(r2)
    y2 = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        _launch(x2, r2, w, y2, ro2, eps)
    return y2.view(shape), (residual if in_place else ro2.view(shape))
