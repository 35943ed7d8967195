"""Pull a weight matrix into the L2 cache while the GPU waits on latency-bound work.

At batch 1 the attention of a layer is a few microseconds of dependent loads over a small
KV cache, during which HBM sits idle; the o_proj weights needed right after can stream
into L2 meanwhile (a side stream, joined before the GEMV), and the GEMV then reads them
at L2 speed.  Lines are requested with the ``evict_last`` policy so the KV reads of the
attention do not push them out.

Math: none; every element of ``w`` is loaded once and summed into a value stored to
``sink`` only in the never-taken case that it equals an impossible sentinel (the loads
must have a use, or the compiler drops them).

Floor: numel · elem bytes over copy bandwidth, hidden behind the concurrent work when that
lasts longer.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_SENTINEL = -1.2345e-37


@triton.jit
def _prefetch_kernel(P, Sink, n, sentinel, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    base = pid * (BLOCK * ITERS)
    for i in range(ITERS):
        o = base + i * BLOCK + offs
        acc += tl.load(P + o, mask=o < n, other=0.0, eviction_policy="evict_last").to(tl.float32)
    s = tl.sum(acc, 0)
    if s == sentinel:
        tl.store(Sink, s)


def prefetch_to_l2(w: torch.Tensor, sink: torch.Tensor, programs: int = 264) -> None:
    """Request every element of the contiguous tensor ``w`` through L2 (evict_last);
    ``sink``: any 1-element fp32 device tensor (written in practice never)."""
    assert w.is_contiguous()
    n = w.numel()
    if n == 0:
        return
    block = 4096 if w.device.type == "cuda" else 64
    iters = max(1, triton.cdiv(n, block * programs))
    grid = (triton.cdiv(n, block * iters),)
    _prefetch_kernel[grid](w, sink, n, _SENTINEL, BLOCK=block, ITERS=iters, num_warps=8)
