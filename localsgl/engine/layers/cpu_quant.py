"""Quantized weights on the CPU: which torch kernel multiplies each format.

    bf16 / fp16 activations:
    int4 (groups of 32..256)   torch's packed int4 CPU GEMM (_weight_int4pack_mm_for_cpu): the
                               nibbles repacked once into its tiled layout, w = s·(u − 8) + z per
                               group with z = m + 8s (asymmetric) or 0, in the activations' dtype
                               (exact in fp32: 8s and m + 8s need no rounding there)
    int8, one scale per row    torch's int8 weight GEMM (_weight_int8pack_mm), scales per row
    int8 (groups of 32..256)   two packed int4 GEMMs, one per nibble: q = 16·hi + lo with hi in
                               -8..7 and lo in 0..15, so s·q (+ m) = 16s·hi + (s·lo (+ m)); the
                               sum of the two products is the weight's, with the scales (and
                               8s + m) rounded to the activations' dtype as for int4.  It reads
                               1 byte a weight plus the scales twice, against 2 for the dense
                               bf16 copy: the embedded model's Q8_0 LM head takes less than
                               half the dense copy's time (bench/RESULTS.md, "Quantized
                               weights on the CPU")
    anything else              (int8 in groups of 16, fp8; every format under fp32 activations) the weight
                               dequantized once into a cached dense copy in the activations'
                               dtype, multiplied as a dense weight (linear.cpu_mm)

Each weight keeps its converted tensors (per activation dtype) on the QuantizedWeight, so a
conversion happens at the first multiply, not per step.  Why these kernels: a decode step on
the CPU streams the weights once per token, and the packed kernels read 0.5 (int4) or 1 byte
(int8) per weight where bf16 reads 2.  With fp32 activations torch's packed kernels take ~20x
their bf16 time (bench/RESULTS.md, "Quantized weights on the CPU"), so fp32 takes the dense
copy.  When a kernel is missing from this torch build, the cached dense route serves.
"""
from __future__ import annotations

import torch

from .cpu_routes import cpu_routes
from .quant import QuantizedWeight, RowStack, matmul_ref, unpack_int4

_INT4_GROUPS = (32, 64, 128, 256)


def cpu_matmul(x: torch.Tensor, w: QuantizedWeight) -> torch.Tensor:
    """x [M, K] @ Wᵀ -> [M, N] in x's dtype by the route for w's format (module docstring)."""
    if isinstance(w, RowStack):
        return torch.cat([cpu_matmul(x, p) for p in w.parts], dim=-1)
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return matmul_ref(x, w)
    cache = _cache(w)
    run = cache.get(x.dtype)
    if run is None:
        route = cache[("route", x.dtype)] = _prepare(w, x.dtype, cache)
        run = cache[x.dtype] = _runner(w, route, cache[(route, x.dtype)])
    return run(x)


def _runner(w: QuantizedWeight, route: str, prepared):
    """The multiply of one route with its prepared tensors bound (a decode step makes ~200 of
    these calls a token: each lookup left out is ~4 us of Python saved per call)."""
    if route == "int4":
        packed, sz = prepared
        group = w.group
        return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), packed, group, sz)
    if route == "int8":
        q, s = prepared

        def int8(x: torch.Tensor) -> torch.Tensor:
            return torch.ops.aten._weight_int8pack_mm(_aligned(x.contiguous()), q, s)

        return int8
    if route == "int8-nibbles":
        (hi, hi_sz), (lo, lo_sz) = prepared
        group = w.group

        def nibbles(x: torch.Tensor) -> torch.Tensor:
            xc = x.contiguous()
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xc, hi, group, hi_sz)
            return y.add_(torch.ops.aten._weight_int4pack_mm_for_cpu(xc, lo, group, lo_sz))

        return nibbles
    from .linear import cpu_mm

    dense = prepared  # [K, N] in the layout the dense weights' CPU route wants
    return lambda x: cpu_mm(x, dense)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a copy of it where its data does not start on a 64-byte boundary: torch's int8
    weight GEMM on x86 reads both operands with aligned vector loads and crashes the process
    (SIGSEGV) on a weight off a 16-byte boundary or activations off a 32-byte one, as a tensor
    inside a safetensors file or a row slice can lie (torch 2.13; bench/RESULTS.md, "twenty-fifth
    session")."""
    return t if t.data_ptr() % 64 == 0 else t.clone(memory_format=torch.contiguous_format)


def _cache(w: QuantizedWeight) -> dict:
    """w's converted tensors; made anew when its buffers were replaced (a move, a new load)."""
    c = w.__dict__.get("_cpu_cache")
    b = w._buffers
    q, s = b["qweight"], b["scales"]
    if c is None or c["qweight"] is not q or c["scales"] is not s:
        c = {"qweight": q, "scales": s}
        w.__dict__["_cpu_cache"] = c
    return c


def _prepare(w: QuantizedWeight, dtype: torch.dtype, cache: dict) -> str:
    packed_ok = dtype != torch.float32  # torch's packed CPU kernels are fast for bf16/fp16 rows only
    if packed_ok and w.fmt.kind == "int4" and w.group in _INT4_GROUPS and w.in_features % w.group == 0:
        try:
            u = unpack_int4(w.qweight).to(torch.int32).contiguous()
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1)
            s = w.scales.float()
            z = (w.mins.float() + 8.0 * s) if w.mins is not None else torch.zeros_like(s)
            sz = torch.stack([s.t(), z.t()], dim=-1).to(dtype).contiguous()  # [K / G, N, 2]
            torch.ops.aten._weight_int4pack_mm_for_cpu(torch.zeros(1, w.in_features, dtype=dtype), packed, w.group, sz)
            cache[("int4", dtype)] = (packed, sz)
            return "int4"
        except (RuntimeError, AttributeError):
            pass  # no packed int4 CPU kernel in this torch: the dense route
    if packed_ok and w.fmt.kind == "int8" and w.mins is None and w.group >= w.in_features:
        try:
            q = _aligned(w.qweight.contiguous())
            s = w.scales.reshape(-1).to(dtype).contiguous()
            torch.ops.aten._weight_int8pack_mm(torch.zeros(1, w.in_features, dtype=dtype), q, s)
            cache[("int8", dtype)] = (q, s)
            return "int8"
        except (RuntimeError, AttributeError):
            pass
    if packed_ok and w.fmt.kind == "int8" and w.group in _INT4_GROUPS and w.in_features % w.group == 0:
        try:
            cache[("int8-nibbles", dtype)] = _int8_as_nibble_gemms(w, dtype)
            return "int8-nibbles"
        except (RuntimeError, AttributeError):
            pass
    dense = w.dequantize(dtype)  # [N, K] row-major: oneDNN's layout; else input-major, the BLAS one
    cache[("dense", dtype)] = dense.t() if cpu_routes(dtype).onednn else dense.t().contiguous()
    return "dense"


def _int8_as_nibble_gemms(w: QuantizedWeight, dtype: torch.dtype):
    """((packed, scales-and-zeros) of the high nibbles, the same of the low ones) of a grouped
    int8 weight, for two _weight_int4pack_mm_for_cpu calls whose sum is x·Wᵀ (module docstring)."""
    q = w.qweight.to(torch.int32)  # int8 values as stored
    hi = q >> 4  # floor(q / 16): -8..7 (an arithmetic shift)
    lo = q & 15  # q - 16·hi: 0..15
    s = w.scales.float()
    m = w.mins.float() if w.mins is not None else torch.zeros_like(s)

    def packed(u: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
        p = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.contiguous(), 1)
        sz = torch.stack([scale.t(), zero.t()], dim=-1).to(dtype).contiguous()  # [K / G, N, 2]
        torch.ops.aten._weight_int4pack_mm_for_cpu(torch.zeros(1, w.in_features, dtype=dtype), p, w.group, sz)
        return p, sz

    # the kernel's weight is scale·(u − 8) + zero: u = hi + 8 with scale 16s and zero 0 gives 16s·hi;
    # u = lo with scale s and zero 8s + m gives s·lo + m
    return packed(hi + 8, 16.0 * s, torch.zeros_like(s)), packed(lo, s, 8.0 * s + m)
