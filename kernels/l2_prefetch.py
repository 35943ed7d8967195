"""Weights pulled into L2 by a short kernel that leaves the memory bus idle, for the GEMV after it.

In a batch-1 decode step the weight streams keep DRAM busy, but the short kernels between
them (the decode attention at short contexts) read next to nothing: for those microseconds
the bus idles, then the next GEMV (o_proj) starts from DRAM.  Such a kernel can take a
share of the next GEMV's weight bytes and issue ``prefetch.global.L2`` for each 128-byte
line of it: a prefetch holds no register and waits for nothing, so the programs go on at
once, the lines arrive while the kernel works, and the GEMV then reads them from L2.

Rules: only bytes no kernel of the step writes (weights) may be prefetched, so a PDL kernel
may do it before its ``gdc_wait``; the span is capped at a share of the L2 (``span_bytes``)
so the lines are still there when the GEMV reaches them, and a kernel that itself streams
more than a quarter of the L2 (the attention over a long context) prefetches nothing: its
own bytes would evict the lines, and the bus is busy anyway (``max_streamed``).  Off on the
CPU, under the interpreter (inline PTX) and below sm_80 (``supported``).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# the batch-1 decode attention prefetching o_proj's weights (the engine's fused one-token step):
# off: on an H100 it made batch 1 slower for int4, fp8 and bf16 (bench/RESULTS.md, twenty-sixth
# session; scripts/bench_quant.py's "-pf" formats switch it on), as did quant_gemv.PREP_PREFETCH_BYTES
BEFORE_O_PROJ = False
MAX_SPANS = 3  # a quantized weight's packed values, scales and offsets
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


@triton.jit
def _prefetch_line(ptrs):
    # the result is a dummy; not pure, so the compiler keeps the instruction
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def prefetch_share(P, nbytes, share, shares, BLOCK: tl.constexpr):
    """Prefetch share ``share`` of ``shares`` equal slices of the lines of [P, P + nbytes) into L2
    (P a byte pointer).  The slice's line count is a runtime value, so one compiled kernel serves
    every weight size; lanes past the end prefetch the last line again (harmless)."""
    lines = (nbytes + 127) // 128
    per = (lines + shares - 1) // shares
    first = share * per
    for j in range(0, per, BLOCK):
        idx = first + j + tl.arange(0, BLOCK)
        idx = tl.minimum(idx, lines - 1).to(tl.int64)
        _prefetch_line(P + idx * 128)


@triton.jit
def prefetch_spans(P0, N0, P1, N1, P2, N2, share, shares, BLOCK: tl.constexpr):
    """``prefetch_share`` over up to three spans (an empty span has N = 0)."""
    if N0 > 0:
        prefetch_share(P0, N0, share, shares, BLOCK)
    if N1 > 0:
        prefetch_share(P1, N1, share, shares, BLOCK)
    if N2 > 0:
        prefetch_share(P2, N2, share, shares, BLOCK)


def supported(device: torch.device) -> bool:
    """Inline PTX prefetches run: a CUDA device of compute capability 8.0+, not interpreted."""
    if device.type != "cuda" or _INTERPRETED or torch.version.hip is not None:
        return False
    return torch.cuda.get_device_capability(device)[0] >= 8


def span_bytes(device: torch.device) -> int:
    """The most bytes one kernel prefetches: half the L2, so the lines outlive the kernel."""
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)) // 2


def max_streamed(device: torch.device) -> int:
    """The most bytes a prefetching kernel may stream itself: a quarter of the L2."""
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)) // 4


def max_tokens(device: torch.device, token_bytes: int) -> int:
    """The longest context a prefetching kernel that streams ``token_bytes`` a token may read
    (``max_streamed``): past it the kernel prefetches nothing."""
    return max_streamed(device) // token_bytes


def spans(tensors, budget: int) -> list[tuple[torch.Tensor, int]]:
    """(byte view, byte count) for each tensor, in order, their sum cut at ``budget``: the
    arguments of ``prefetch_spans`` (padded with empty spans by ``kernel_args``)."""
    out = []
    for t in tensors:
        if t is None or budget <= 0:
            continue
        assert t.is_contiguous(), "a prefetched span must be one contiguous block"
        n = min(t.numel() * t.element_size(), budget)
        out.append((t.view(-1).view(torch.uint8) if t.dtype != torch.uint8 else t.view(-1), n))
        budget -= n
    assert len(out) <= MAX_SPANS
    return out


def kernel_args(span_list, dummy: torch.Tensor) -> dict:
    """P0, N0, P1, N1, P2, N2 for a kernel that hands them to ``prefetch_spans``, and PREFETCH
    (whether there is a span); ``dummy`` (any tensor) stands in for the empty spans' pointers."""
    args = {"PREFETCH": bool(span_list)}
    for i in range(MAX_SPANS):
        p, n = span_list[i] if i < len(span_list) else (dummy, 0)
        args[f"P{i}"], args[f"N{i}"] = p, n
    return args
