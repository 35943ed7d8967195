"""The sweep shared by the probes of a route that a tuned entry switches on in place of the GEMM
(quant_gemm.matmul: "rows", kernels/quant_rows.py; "a8", kernels/quant_a8.py): per weight format,
Llama-3.1-8B shape and row bucket, every tile of the route against the GEMM's tuned tile, kernels
alone in CUDA graphs, each tile checked against the fp32 product with the unrounded activations
(within the int8 activations' rounding, 2 %) before it is timed.  Then this GPU's tuned file with
an entry a (format, shape, rows): the best tile where it beat the GEMM by 3 % or more, else a null
tile (the GEMM there, and for the shapes that borrow that entry: quant_tiles.lookup), written
after every shape.

The tiles are compiled first by ``jobs`` processes at once (Triton's disk cache is shared)."""
from __future__ import annotations

import importlib
import itertools
import multiprocessing as mp
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from probe_quant import cold_copies, copy_bandwidth, per_copy, timed  # noqa: E402
from merge_tiles import merge, write  # noqa: E402
from probe_quant_tiles import GEMM_SHAPES, _weight  # noqa: E402

from localsgl_kernels import quant_gemm as QM  # noqa: E402
from localsgl_kernels.quant_tiles import _entries  # noqa: E402


def _compile(batch) -> int:
    """Compile a share of the variants: one call each on a small weight (the kernels' constexprs
    do not depend on N or K), so the timing loop finds them in Triton's cache."""
    ok = 0
    for module, fmt, m, cfg in batch:
        route = importlib.import_module(module)
        w = _weight(fmt, 512, 4096)
        x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        try:
            if route.applies(w, m, cfg):
                route.matmul(x, w, cfg)
                ok += 1
        except Exception as e:  # out of resources: skipped when timed
            print(f"compile {fmt} {m} {cfg}: {type(e).__name__}: {str(e)[:100]}", flush=True)
    torch.cuda.synchronize()
    return ok


def sweep(kind: str, module: str, formats: list[str], buckets: list[int], tiles, out: str | None,
          jobs: int = 16, warm: bool = False) -> None:
    """Times ``module``'s tiles (``tiles(m)``: the Config candidates at m rows) for each format,
    shape and bucket against the GEMM, prints a table, and writes ``out`` (see the docstring).
    Each is timed over copies of the weight called in turn (probe_quant.cold_copies; ``warm``:
    the weight alone, from L2 where it fits)."""
    route = importlib.import_module(module)
    todo = [(module, fmt, m, cfg) for fmt in formats for m in buckets for cfg in tiles(m)]
    t0 = time.time()
    with mp.get_context("spawn").Pool(jobs) as pool:
        n = sum(pool.map(_compile, [todo[i::jobs] for i in range(jobs)]))
    print(f"compiled {n} of {len(todo)} variants in {time.time() - t0:.0f} s", flush=True)
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy {bw / 1e12:.2f} TB/s", flush=True)
    print(f"{'fmt':9s} {'shape':8s} {'M':>3s} {'floor':>6s} {'gemm':>7s} {kind:>7s}  best tile", flush=True)
    base = [dict(e) for e in _entries(torch.cuda.current_device(), None)]  # the tuned file as it was
    entries = []
    for fmt, (name, (n, k)), m in itertools.product(formats, GEMM_SHAPES.items(), buckets):
        w = _weight(fmt, n, k)
        ws = cold_copies(w, not warm)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        exact = x.float() @ w.dequantize(torch.float32).t()
        gemm_us = timed(per_copy(ws, lambda wi: QM.gemm(x, wi)), 10)
        best = None
        for cfg in tiles(m):
            if not route.applies(w, m, cfg):
                continue
            try:
                y = route.matmul(x, w, cfg)
            except Exception as e:  # out of resources: skipped
                print(f"  {cfg}: {type(e).__name__}: {str(e)[:100]}", flush=True)
                continue
            if float((y.float() - exact).norm() / exact.norm()) > 2e-2:
                print(f"  {cfg}: WRONG", flush=True)
                continue
            us = timed(per_copy(ws, lambda wi: route.matmul(x, wi, cfg)), 10)
            if best is None or us < best[0]:
                best = (us, cfg)
        floor = w.nbytes / bw * 1e6
        route_us = best[0] if best else float("nan")
        print(f"{fmt:9s} {name:8s} {m:3d} {floor:6.1f} {gemm_us:7.1f} {route_us:7.1f}  "
              f"{tuple(best[1]) if best else '-'}", flush=True)
        win = bool(best) and best[0] < 0.97 * gemm_us
        entries.append(dict(kind=kind, fmt=w.fmt.label(), n=n, k=k, m=m, tile=list(best[1]) if win else None))
        del w, ws
        if out:  # after every shape: a run stopped by its time limit keeps the shapes it finished
            write(out, merge(base, [dict(e, label=e["fmt"]) for e in entries], entries))
    if out:
        won = sum(e["tile"] is not None for e in entries)
        print(f"{won} {kind} tiles, {len(entries) - won} shapes left to the GEMM -> {out}")
