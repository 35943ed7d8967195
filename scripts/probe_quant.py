"""Quantized matmul kernels alone on the Llama-3.1-8B shapes: µs per call (in a CUDA graph, as
decode runs them) and the bandwidth they reach, against the bf16 one-row GEMV
(kernels/gemv.py) and cuBLAS.

    python scripts/probe_quant.py [ROWS ...]        (default rows: 1 4 64 2048)

For one row the floor is the packed weight bytes (+ scales) over the measured copy bandwidth;
prints one line per (shape, format, rows)."""
from __future__ import annotations

import copy
import functools
import sys

import torch

from localsgl.engine.layers.quant import QuantizedWeight, WeightFormat
from localsgl_kernels import gemv as G
from localsgl_kernels import quant_gemm, quant_gemv

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}
FORMATS = {"int4 g128": WeightFormat("int4", 128, False), "int4 g32": WeightFormat("int4", 32, False),
           "int8": WeightFormat("int8", 0, True), "fp8": WeightFormat("fp8", 0, True)}


def timed(fn, reps: int = 20) -> float:
    """µs per call: ``reps`` calls captured in a CUDA graph (no launch overhead), median of 5 replays.
    ``fn`` may be a list of calls (one per copy of a weight, cold_copies): they are called in turn,
    so each call reads its weight from memory as a decode step's layers do, not from L2."""
    calls = list(fn) if isinstance(fn, (list, tuple)) else [fn]
    reps = -(-max(reps, len(calls)) // len(calls)) * len(calls)
    for _ in range(2):
        for c in calls:
            c()  # compile and warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            calls[i % len(calls)]()
    times = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / reps)
    times.sort()
    return times[2]


COLD_L2_FACTOR = 3


def cold_copies(w, cold: bool = True, l2_bytes: int | None = None) -> list:
    """``w`` and copies of it that together hold COLD_L2_FACTOR times the GPU's L2 (one copy:
    [w] when ``cold`` is False or w alone is that large).  A weight smaller than L2 timed alone
    is read from L2 after its first call (the H100's and H200's 50 MB hold o_proj, q/k/v and
    down_proj of an 8B model), which a decode step never does: its 32 layers are distinct weights.
    ``l2_bytes``: the L2's size instead of the GPU's."""
    if not cold:
        return [w]
    l2 = l2_bytes if l2_bytes is not None else torch.cuda.get_device_properties(w.qweight.device).L2_cache_size
    n = max(1, -(-COLD_L2_FACTOR * l2 // max(1, w.nbytes)))
    return [w] + [copy.deepcopy(w) for _ in range(n - 1)]


def per_copy(ws: list, fn) -> list:
    """``fn(w)`` for each copy ``w`` of ``ws`` (cold_copies) as zero-argument calls, for ``timed``."""
    return [functools.partial(fn, w) for w in ws]


def copy_bandwidth() -> float:
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    us = timed(lambda: y.copy_(x), 5)
    return 2 * x.numel() / (us * 1e-6)


def main() -> None:
    rows_list = [int(a) for a in sys.argv[1:]] or [1, 4, 64, 2048]
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy {bw / 1e12:.2f} TB/s (read+write)")
    g = torch.Generator(device="cuda").manual_seed(0)
    for name, (n, k) in SHAPES.items():
        dense = (torch.randn(n, k, device="cuda", generator=g) * k**-0.5).to(torch.bfloat16)
        for m in rows_list:
            if name == "lm_head" and m > 64:
                continue
            x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
            base = timed(lambda: torch.nn.functional.linear(x, dense))
            line = [f"{name:8s} M={m:<5d} cuBLAS bf16 {base:8.1f} us"]
            if m == 1 and G.gemv_supported(n, k, "cuda"):
                us = timed(lambda: G.gemv(x, dense))
                line.append(f"gemv bf16 {us:8.1f} us ({2 * n * k / us / 1e3:6.0f} GB/s)")
            for label, fmt in FORMATS.items():
                w = QuantizedWeight.quantize(dense, fmt)
                us = timed(lambda: quant_gemm.matmul(x, w))
                floor = w.nbytes / bw * 1e6  # the packed bytes over the copy bandwidth (as DESIGN.md §5)
                line.append(f"{label} {us:8.1f} us ({w.nbytes / us / 1e3:6.0f} GB/s, {us / floor:4.2f}x floor)"
                            if m == 1 else f"{label} {us:8.1f} us")
                del w
            print(" | ".join(line), flush=True)
        del dense


if __name__ == "__main__":
    main()
