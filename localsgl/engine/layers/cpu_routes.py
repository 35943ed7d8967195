"""Which CPU kernel route a dtype's GEMMs and attention take, chosen by what this process's
torch can run natively.

Why: the fastest CPU route differs by machine, by up to 30x.  With native bf16/fp16 matmul
(oneDNN on avx512_bf16 / AMX / avx512_fp16) torch's low-precision GEMM beats widening the
weights to fp32 at every row count.  Without it (e.g. an AVX2-only CPU) torch's bf16 GEMM runs
a generic loop, far slower on an input-major weight than torch's bf16 GEMV on a row-major
weight, which accumulates in fp32 with vector code; from a few rows on, widening the weight to
fp32 in a scratch buffer and running the fp32 GEMM beats both.  In fp32 the faster weight
layout differs by CPU (below).

Signals: ``torch.backends.cpu.get_cpu_capability()`` (honours ``ATEN_CPU_CAPABILITY``) and
``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` / ``_fp16_`` (honour ``ONEDNN_MAX_CPU_ISA``),
read once per process and dtype.  ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` on a
newer x86 CPU therefore takes the AVX2-only routes.  Three choices no flag says are probed
once per process and dtype, each leaving the default only for a clearly faster alternative:
  * fp32's layout: the one torch's BLAS streams fastest, input-major (x @ W^T on a contiguous
    W^T) unless row-major is faster (:func:`probe_fp32_layout`, on weights larger than a
    core's cache).  Input-major is as fast or faster on the Intel CPUs measured; row-major is
    reported faster on an AMD EPYC (bench/RESULTS.md, "CPU decode routes").
  * the GEMM library: torch's BLAS is MKL, which on an AMD EPYC runs behind oneDNN on the
    same row-major weights (up to 2.3x at 32 rows), while on Intel CPUs it is as fast; so a
    dtype's dense GEMMs go through oneDNN's matmul (``torch.ops.mkldnn._linear_pointwise`` on
    the row-major weight) where :func:`probe_onednn` finds it faster than the BLAS route
    (bench/RESULTS.md, "CPU routes on a 2-core AMD EPYC").
  * attention of a native low-precision dtype runs in fp32 where :func:`probe_lowp_attention`
    finds torch's SDPA faster that way, as on that EPYC.
Every route computes the same products with fp32 accumulation; they differ in speed, in the
order of the sums and, in bf16/fp16, in where the rounding to the dtype happens.
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
ONEDNN_MARGIN = 1.15  # the GEMMs leave the BLAS route only for oneDNN's this much faster
ATTENTION_FP32_MARGIN = 1.15  # native low-precision attention moves to fp32 only when this much faster


@dataclass(frozen=True)
class CpuRoutes:
    """How the CPU multiplies and attends in one dtype."""

    dtype: torch.dtype
    capability: str  # torch's CPU capability (DEFAULT, AVX2, AVX512, ...)
    native: bool  # the dtype's matmul runs natively (fp32 always; bf16/fp16 through oneDNN)
    input_major: bool  # Linear weights stored as contiguous [in, out] (else row-major [out, in])
    widen_min_rows: int  # GEMMs of at least this many rows widen the weights to fp32 (0: never)
    attention_fp32: bool  # attention of this dtype computed in fp32
    onednn: bool = False  # dense GEMMs by oneDNN's matmul on row-major weights (else torch's BLAS)

    def widen(self, rows: int) -> bool:
        return 0 < self.widen_min_rows <= rows

    def describe(self) -> str:
        widen = f"widen to fp32 from {self.widen_min_rows} rows" if self.widen_min_rows else "no widening"
        return (f"{str(self.dtype).removeprefix('torch.')} on {self.capability}: "
                f"{'native' if self.native else 'emulated'}, "
                f"{'input-major' if self.input_major else 'row-major'} weights, "
                f"{'oneDNN' if self.onednn else 'BLAS'} GEMMs, {widen}, "
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


def choose(dtype: torch.dtype, capability: str, native: bool, fp32_input_major: bool = True,
           onednn: bool = False, lowp_attention_fp32: bool = False) -> CpuRoutes:
    """The routes for one dtype given the machine's signals (a pure function, for tests).

    fp32: oneDNN GEMMs on row-major weights where the probe found them clearly faster, else
    input-major weights unless the probe found row-major GEMMs clearly faster.  bf16/fp16 with
    native matmul: row-major weights (the native GEMV streams them fastest at one row; at 32
    rows the layouts tie), oneDNN or BLAS GEMMs as probed, no widening, attention in the dtype
    unless its probe found fp32 clearly faster.  Without native matmul: row-major weights
    (torch's low-precision GEMV wants them), BLAS, widening from WIDEN_MIN_ROWS rows,
    attention in fp32 (torch's emulated bf16 SDPA is slower)."""
    if dtype not in LOWP:
        return CpuRoutes(dtype, capability, True, fp32_input_major and not onednn, widen_min_rows=0,
                         attention_fp32=False, onednn=onednn)
    if native:
        return CpuRoutes(dtype, capability, True, input_major=False, widen_min_rows=0,
                         attention_fp32=lowp_attention_fp32, onednn=onednn)
    return CpuRoutes(dtype, capability, False, input_major=False, widen_min_rows=WIDEN_MIN_ROWS, attention_fp32=True)


def prefer_input_major(times: list[tuple[float, float]]) -> bool:
    """The fp32 layout decision from the probe's (input-major, row-major) best times per row
    count: input-major (as fast or faster on the Intel CPUs measured) unless row-major is
    clearly faster over the row counts together (geometric mean of the ratios, so one row
    counts as much as 32)."""
    ratio = math.prod(t_in / t_row for t_in, t_row in times) ** (1 / len(times))
    return ratio < ROW_MAJOR_MARGIN


def _timed_rounds(candidates: list, budget_s: float) -> list[float]:
    """Best process-CPU time of each callable, timed alternately: one warm-up round (the BLAS's
    own dispatch), then at least 2 rounds until ``budget_s`` has passed; at most 64.  The
    process's CPU time, which other work on a busy machine disturbs far less than the wall
    clock (a wall-clock probe there answers at random)."""
    best = [float("inf")] * len(candidates)
    start = time.process_time()
    for i in range(64):
        for j, f in enumerate(candidates):
            t = time.process_time()
            f()
            if i:
                best[j] = min(best[j], time.process_time() - t)
        if i >= 2 and time.process_time() - start > budget_s:
            break
    return best


def probe_fp32_layout(rows: tuple[int, ...] = (1, 32), k: int = 576, n: int = 1536, mib: int = 32,
                      budget_s: float = 0.15) -> list[tuple[float, float]]:
    """Best times of x @ W^T over ``mib`` MiB of [n, k] weights (the shape of a small model's
    MLP), input-major (W^T contiguous) and row-major (W contiguous), for x of each row count:
    [(input-major s, row-major s)] per row count.  The weights are more than a core's cache
    holds, so they stream as in a decode step (on a weight that stays in cache the layouts
    rank differently)."""
    g = torch.Generator().manual_seed(0)
    count = max(1, (mib << 20) // (4 * k * n))
    ws = [torch.empty(n, k).uniform_(-1, 1, generator=g) for _ in range(count)]
    input_major, row_major = [w.t().contiguous() for w in ws], [w.t() for w in ws]
    out = []
    for r in rows:
        x = torch.empty(r, k).uniform_(-1, 1, generator=g)
        out.append(tuple(_timed_rounds([lambda: [torch.mm(x, w) for w in input_major],
                                        lambda: [torch.mm(x, w) for w in row_major]], budget_s / len(rows))))
    return out


def onednn_available() -> bool:
    """Whether this torch has oneDNN's linear op (an inductor op of CPU builds with mkldnn)."""
    try:
        return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


def onednn_mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ w.T for a contiguous row-major w [N, K], by oneDNN's matmul."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), w, None, "none", [], "")


def blas_mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ w [K, N] by torch's BLAS, w a weight's [in, out] view: torch's GEMV for one
    row of a row-major weight (w the transpose view; its GEMM path streams a single bf16 row up
    to 1.7x slower on some CPUs), else its GEMM.  linear.cpu_mm's route where oneDNN is not
    taken, and the probe's baseline."""
    if x.shape[0] == 1 and w.stride(0) == 1 and w.shape[1] > 1:
        return torch.mv(w.t(), x[0]).unsqueeze(0)
    return torch.mm(x, w)


def probe_onednn(dtype: torch.dtype, fp32_input_major: bool = True, rows: tuple[int, ...] = (1, 32), k: int = 576,
                 n: int = 1536, mib: int = 32, budget_s: float = 0.15) -> list[tuple[float, float]]:
    """[(BLAS route s, oneDNN s)] per row count for x @ W^T over ``mib`` MiB of [n, k] weights
    in ``dtype`` (more than a core's cache, as in probe_fp32_layout): the BLAS route as cpu_mm
    takes it (fp32: on the layout ``fp32_input_major`` says; bf16/fp16: on row-major weights),
    oneDNN's matmul on the row-major weights."""
    g = torch.Generator().manual_seed(0)
    count = max(1, (mib << 20) // (torch.finfo(dtype).bits // 8 * k * n))
    ws = [torch.empty(n, k).uniform_(-1, 1, generator=g).to(dtype) for _ in range(count)]
    # the [in, out] views cpu_mm gets: input-major copies, or the row-major weights' transposes
    views = [w.t().contiguous() if dtype == torch.float32 and fp32_input_major else w.t() for w in ws]
    out = []
    for r in rows:
        x = torch.empty(r, k).uniform_(-1, 1, generator=g).to(dtype)
        blas = lambda: [blas_mm(x, v) for v in views]  # noqa: E731
        out.append(tuple(_timed_rounds([blas, lambda: [onednn_mm(x, w) for w in ws]], budget_s / len(rows))))
    return out


def probe_lowp_attention(dtype: torch.dtype, batches: tuple[int, ...] = (1, 32), heads: int = 8, kv_heads: int = 2,
                         head_dim: int = 64, context: int = 256, budget_s: float = 0.1) -> list[tuple[float, float]]:
    """[(SDPA in ``dtype`` s, SDPA in fp32 with the casts s)] per batch, for one decode token per
    row over ``context`` keys (a mask where the batch has several rows, as the decode step
    passes one then)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for b in batches:
        q = torch.randn(b, heads, 1, head_dim, generator=g).to(dtype)
        k = torch.randn(b, kv_heads, context, head_dim, generator=g).to(dtype)
        v = torch.randn(b, kv_heads, context, head_dim, generator=g).to(dtype)
        mask = torch.zeros(b, 1, 1, context, dtype=dtype) if b > 1 else None
        mask32 = mask.float() if mask is not None else None
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def low():
            sdpa(q, k, v, attn_mask=mask, enable_gqa=heads != kv_heads)

        def wide():
            sdpa(q.float(), k.float(), v.float(), attn_mask=mask32, enable_gqa=heads != kv_heads).to(dtype)

        out.append(tuple(_timed_rounds([low, wide], budget_s / len(batches))))
    return out


def _faster(times: list[tuple[float, float]], margin: float) -> bool:
    """Whether the second of each pair is faster than the first by ``margin`` over the pairs
    together (geometric mean of the ratios, so each row count counts alike)."""
    return math.prod(a / b for a, b in times) ** (1 / len(times)) >= margin


@functools.cache
def detected_routes(dtype: torch.dtype) -> CpuRoutes:
    """The routes for ``dtype`` on this machine (cached per process; probed once: fp32's
    layout, whether oneDNN's GEMMs beat the BLAS route, a native low-precision dtype's
    attention)."""
    t0 = time.perf_counter()
    native = native_matmul(dtype)
    fp32_input_major, onednn, attention_fp32, notes = True, False, False, []

    def note(what: str, times: list[tuple[float, float]]) -> None:
        notes.append(f"{what} ms at 1, 32 rows: " + ", ".join(f"{a * 1e3:.2f}/{b * 1e3:.2f}" for a, b in times))

    with torch.inference_mode():
        if dtype == torch.float32:
            times = probe_fp32_layout()
            fp32_input_major = prefer_input_major(times)
            note("layout (input-major / row-major)", times)
        if native and onednn_available():
            try:
                times = probe_onednn(dtype, fp32_input_major)
            except RuntimeError as e:  # an op this build cannot run: the BLAS route
                notes.append(f"oneDNN unavailable ({e})")
            else:
                onednn = _faster(times, ONEDNN_MARGIN)
                note("GEMMs (BLAS / oneDNN)", times)
        if native and dtype in LOWP:
            times = probe_lowp_attention(dtype)
            attention_fp32 = _faster(times, ATTENTION_FP32_MARGIN)
            note("attention (dtype / fp32)", times)
    routes = choose(dtype, torch.backends.cpu.get_cpu_capability(), native, fp32_input_major, onednn, attention_fp32)
    log.info("CPU routes: %s (probes %.0f ms: %s)", routes.describe(), (time.perf_counter() - t0) * 1e3,
             "; ".join(notes))
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
