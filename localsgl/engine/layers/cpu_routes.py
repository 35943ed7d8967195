"""Which CPU kernel route a dtype's GEMMs and attention take, chosen by what this process's
torch can run natively.

Why: the fastest CPU route differs by machine, by up to 30x.  With native bf16/fp16 matmul
(oneDNN on avx512_bf16 / AMX / avx512_fp16) torch's low-precision GEMM beats widening the
weights to fp32 at every row count.  Without it (e.g. an AVX2-only CPU) torch's bf16 GEMM runs
a generic loop: on an input-major weight it is 10-30x slower than torch's bf16 GEMV on a
row-major weight, which accumulates in fp32 with vector code; from a few rows on, widening the
weight to fp32 in a scratch buffer and running the fp32 GEMM beats both.  In fp32, x @ W^T on a
contiguous W^T (input-major) is as fast as mv for one row and up to 2.8x faster than the
row-major GEMM for 32 (bench/RESULTS.md, "CPU decode routes").

Signals: ``torch.backends.cpu.get_cpu_capability()`` (honours ``ATEN_CPU_CAPABILITY``) and
``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` / ``_fp16_`` (honour ``ONEDNN_MAX_CPU_ISA``),
read once per process and dtype.  ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` on a
newer x86 CPU therefore takes the AVX2-only routes.  Every route computes the same products
with fp32 accumulation; they differ in speed and, in bf16/fp16, in where the rounding to the
dtype happens.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch

LOWP = (torch.bfloat16, torch.float16)
WIDEN_MIN_ROWS = 8  # rows from which widening beats torch's bf16 GEMV without native bf16 (bench/RESULTS.md)


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


def choose(dtype: torch.dtype, capability: str, native: bool) -> CpuRoutes:
    """The routes for one dtype given the machine's signals (a pure function, for tests).

    fp32: input-major weights.  bf16/fp16 with native matmul: row-major weights (the native
    GEMV streams them fastest at one row; at 32 rows the layouts tie), no widening, attention in
    the dtype.  Without native matmul: row-major weights (torch's low-precision GEMV wants them),
    widening from WIDEN_MIN_ROWS rows, attention in fp32 (2.5x faster than emulated bf16 SDPA)."""
    if dtype not in LOWP:
        return CpuRoutes(dtype, capability, True, input_major=True, widen_min_rows=0, attention_fp32=False)
    if native:
        return CpuRoutes(dtype, capability, True, input_major=False, widen_min_rows=0, attention_fp32=False)
    return CpuRoutes(dtype, capability, False, input_major=False, widen_min_rows=WIDEN_MIN_ROWS, attention_fp32=True)


@functools.cache
def detected_routes(dtype: torch.dtype) -> CpuRoutes:
    """The routes for ``dtype`` on this machine (cached per process)."""
    return choose(dtype, torch.backends.cpu.get_cpu_capability(), native_matmul(dtype))


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
