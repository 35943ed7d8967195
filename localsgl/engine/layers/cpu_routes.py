"""Which CPU kernel route a dtype's GEMMs and attention take, chosen by what this process's
torch can run natively.

Why: the fastest CPU route differs by machine, by up to 30x.  With native bf16/fp16 matmul
(oneDNN on avx512_bf16 / AMX / avx512_fp16) torch's low-precision GEMM beats widening the
weights to fp32 at every row count.  Without it (e.g. an AVX2-only CPU) torch's bf16 GEMM runs
a generic loop: on an input-major weight it is 10-30x slower than torch's bf16 GEMV on a
row-major weight, which accumulates in fp32 with vector code; from a few rows on, widening the
weight to fp32 in a scratch buffer and running the fp32 GEMM beats both.  In fp32 the faster
weight layout differs by CPU (below).

Signals: ``torch.backends.cpu.get_cpu_capability()`` (honours ``ATEN_CPU_CAPABILITY``) and
``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` / ``_fp16_`` (honour ``ONEDNN_MAX_CPU_ISA``),
read once per process and dtype.  ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` on a
newer x86 CPU therefore takes the AVX2-only routes.  The fp32 layout is the one torch's BLAS
streams fastest on this CPU, which no flag says: on one Intel CPU x @ W^T on a contiguous W^T
(input-major) was as fast as mv at one row and up to 2.8x faster than the row-major GEMM from
4 rows on; on another the two were within the machine's noise in the engine, and a
transformers-style row-major GEMM was reported faster on an AMD EPYC (bench/RESULTS.md, "CPU
decode routes").  A probe times both layouts once per process on weights larger than a
core's cache (:func:`probe_fp32_layout`); input-major stays unless row-major is clearly
faster.
Every route computes the same products with fp32 accumulation; they differ in speed and, in
bf16/fp16, in where the rounding to the dtype happens.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from dataclasses import dataclass

import torch

log = logging.getLogger("localsgl.engine")

LOWP = (torch.bfloat16, torch.float16)
WIDEN_MIN_ROWS = 8  # rows from which widening beats torch's bf16 GEMV without native bf16 (bench/RESULTS.md)
ROW_MAJOR_MARGIN = 1.15  # fp32 leaves the input-major layout only for row-major GEMMs this much faster


@dataclass(frozen=True)
class CpuRoutes:
    """How the CPU multiplies and attends in one dtype."""

    dtype: torch.dtype
    capability: str  # torch's CPU capability (DEFAULT, AVX2, AVX512, ...)
    native: bool  # the dtype's matmul runs natively (fp32 always; bf16/fp16 through oneDNN)
    input_major: bool  # Linear weights stored as contiguous [in, out] (else row-major [out, in])
    widen_min_rows: int  # GEMMs of at least this many rows widen the weights to fp32 (0: never)
    attention_fp32: bool  # attention of this dtype computed in fp32

    def widen(self, rows: int) -> bool:
        return 0 < self.widen_min_rows <= rows

    def describe(self) -> str:
        widen = f"widen to fp32 from {self.widen_min_rows} rows" if self.widen_min_rows else "no widening"
        return (f"{str(self.dtype).removeprefix('torch.')} on {self.capability}: "
                f"{'native' if self.native else 'emulated'}, "
                f"{'input-major' if self.input_major else 'row-major'} weights, {widen}, "
                f"attention in {'fp32' if self.attention_fp32 else 'the dtype'}")


def native_matmul(dtype: torch.dtype) -> bool:
    """Whether torch multiplies ``dtype`` natively on this CPU (oneDNN for bf16/fp16)."""
    if dtype not in LOWP:
        return True
    try:
        ops = torch.ops.mkldnn
        check = ops._is_mkldnn_bf16_supported if dtype == torch.bfloat16 else ops._is_mkldnn_fp16_supported
        return bool(torch.backends.mkldnn.is_available() and check())
    except (AttributeError, RuntimeError):  # a torch build without these probes
        return False


def choose(dtype: torch.dtype, capability: str, native: bool, fp32_input_major: bool = True) -> CpuRoutes:
    """The routes for one dtype given the machine's signals (a pure function, for tests).

    fp32: input-major weights unless the probe found row-major GEMMs clearly faster.  bf16/fp16
    with native matmul: row-major weights (the native GEMV streams them fastest at one row; at
    32 rows the layouts tie), no widening, attention in the dtype.  Without native matmul:
    row-major weights (torch's low-precision GEMV wants them), widening from WIDEN_MIN_ROWS
    rows, attention in fp32 (torch's emulated bf16 SDPA is slower)."""
    if dtype not in LOWP:
        return CpuRoutes(dtype, capability, True, fp32_input_major, widen_min_rows=0, attention_fp32=False)
    if native:
        return CpuRoutes(dtype, capability, True, input_major=False, widen_min_rows=0, attention_fp32=False)
    return CpuRoutes(dtype, capability, False, input_major=False, widen_min_rows=WIDEN_MIN_ROWS, attention_fp32=True)


def prefer_input_major(times: list[tuple[float, float]]) -> bool:
    """The fp32 layout decision from the probe's (input-major, row-major) best times per row
    count: input-major (faster in the engine on both Intel CPUs measured) unless row-major is
    clearly faster over the row counts together (geometric mean of the ratios, so one row
    counts as much as 32)."""
    ratio = math.prod(t_in / t_row for t_in, t_row in times) ** (1 / len(times))
    return ratio < ROW_MAJOR_MARGIN


def probe_fp32_layout(rows: tuple[int, ...] = (1, 32), k: int = 576, n: int = 1536, mib: int = 32,
                      budget_s: float = 0.15) -> list[tuple[float, float]]:
    """Best times of x @ W^T over ``mib`` MiB of [n, k] weights (the shape of a small model's
    MLP), input-major (W^T contiguous) and row-major (W contiguous), for x of each row count:
    [(input-major s, row-major s)] per row count.  The weights are more than a core's cache
    holds, so they stream as in a decode step (on a weight that stays in cache the layouts
    rank differently).  Times are the process's CPU time, which other work on a busy machine
    disturbs far less than the wall clock; the layouts are timed alternately until
    ``budget_s`` of it has passed, at least 2 rounds after a warm-up."""
    g = torch.Generator().manual_seed(0)
    count = max(1, (mib << 20) // (4 * k * n))
    ws = [torch.empty(n, k).uniform_(-1, 1, generator=g) for _ in range(count)]
    layouts = ([w.t().contiguous() for w in ws], [w.t() for w in ws])
    xs = [torch.empty(r, k).uniform_(-1, 1, generator=g) for r in rows]
    best = [[float("inf")] * 2 for _ in rows]
    start = time.process_time()
    for i in range(64):
        for x, b in zip(xs, best):
            for j, layout in enumerate(layouts):
                t = time.process_time()
                for w in layout:
                    torch.mm(x, w)
                if i:  # the first round warms the BLAS's own dispatch
                    b[j] = min(b[j], time.process_time() - t)
        if i >= 2 and time.process_time() - start > budget_s:
            break
    return [(t_in, t_row) for t_in, t_row in best]


@functools.cache
def detected_routes(dtype: torch.dtype) -> CpuRoutes:
    """The routes for ``dtype`` on this machine (cached per process; fp32 probes once)."""
    fp32_input_major = True
    if dtype == torch.float32:
        t0 = time.perf_counter()
        times = probe_fp32_layout()
        fp32_input_major = prefer_input_major(times)
        log.debug("fp32 layout probe (input-major / row-major ms at 1, 32 rows): %s (%.0f ms)",
                  ", ".join(f"{a * 1e3:.2f}/{b * 1e3:.2f}" for a, b in times), (time.perf_counter() - t0) * 1e3)
    routes = choose(dtype, torch.backends.cpu.get_cpu_capability(), native_matmul(dtype), fp32_input_major)
    log.debug("CPU routes: %s", routes.describe())
    return routes


_forced: dict[torch.dtype, CpuRoutes] = {}


def cpu_routes(dtype: torch.dtype) -> CpuRoutes:
    """The routes ``dtype`` takes: this machine's, unless :func:`forced` says otherwise."""
    return _forced.get(dtype) or detected_routes(dtype)


@contextlib.contextmanager
def forced(routes: CpuRoutes):
    """Tests and A/B benchmarks: ``routes`` serve their dtype in every thread inside the block
    (weights laid out before it keep their layout; every route handles either layout)."""
    before = _forced.get(routes.dtype)
    _forced[routes.dtype] = routes
    try:
        yield routes
    finally:
        if before is None:
            _forced.pop(routes.dtype, None)
        else:
            _forced[routes.dtype] = before
