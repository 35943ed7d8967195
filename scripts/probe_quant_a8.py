"""The int4 x int8-activation GEMM (kernels/quant_a8.py) against the GEMM's tuned tile
(quant_gemm), per Llama-3.1-8B shape at 16 and 64 rows, kernels alone in CUDA graphs (the a8
time includes its activations' preparation); then writes this GPU's tuned file with an "a8"
entry for each (shape, rows): its best tile where it beat the GEMM by 3 % or more, else a null tile
(the GEMM there, and for the shapes that borrow that entry: quant_tiles.lookup).

    python scripts/probe_quant_a8.py [--formats int4g128] [--out TUNED.json] [--jobs 16]

The tiles are compiled first by ``--jobs`` processes at once (Triton's disk cache is shared).
Each tile is checked against the fp32 product with the unrounded activations (within the int8
activations' rounding, 2 %) before it is timed.  ``--out``: kernels/tuned/<GPU>.json's entries
with the winners added (LOCALSGL_QUANT_TILES=TUNED.json makes the engine use them)."""
from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from probe_quant import copy_bandwidth, timed  # noqa: E402
from probe_quant_tiles import GEMM_SHAPES, _weight  # noqa: E402

from localsgl_kernels import quant_a8 as QA  # noqa: E402
from localsgl_kernels import quant_gemm as QM  # noqa: E402

TILES = [QA.Config(bm, bn, warps, stages, swap, split)
         for bm, bn, warps, stages, swap, split in itertools.product(
             (16, 32, 64), (64, 128, 256), (4, 8), (2, 3, 4), (0, 1), (1, 2, 4))]


def _tiles(m: int) -> list:
    return [c for c in TILES if c.block_m <= m]


def _compile(batch) -> int:
    """Compile a share of the variants: one call each on a small weight (the kernel's constexprs
    do not depend on N or K), so the timing loop finds them in Triton's cache."""
    ok = 0
    for fmt, m, cfg in batch:
        w = _weight(fmt, 512, 4096)
        x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        try:
            if QA.applies(w, m, cfg):
                QA.matmul(x, w, cfg)
                ok += 1
        except Exception as e:  # out of resources: skipped when timed
            print(f"compile {fmt} {m} {cfg}: {type(e).__name__}: {str(e)[:100]}", flush=True)
    torch.cuda.synchronize()
    return ok


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", nargs="*", default=["int4g128"])
    ap.add_argument("--rows", nargs="*", type=int, default=[16, 64])
    ap.add_argument("--out", default=None)
    ap.add_argument("--jobs", type=int, default=16)
    a = ap.parse_args()
    todo = [(fmt, m, cfg) for fmt in a.formats for m in a.rows for cfg in _tiles(m)]
    t0 = time.time()
    with mp.get_context("spawn").Pool(a.jobs) as pool:
        n = sum(pool.map(_compile, [todo[i::a.jobs] for i in range(a.jobs)]))
    print(f"compiled {n} of {len(todo)} variants in {time.time() - t0:.0f} s", flush=True)
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy {bw / 1e12:.2f} TB/s", flush=True)
    print(f"{'fmt':9s} {'shape':8s} {'M':>3s} {'floor':>6s} {'gemm':>7s} {'a8':>7s}  best tile", flush=True)
    winners, measured = [], set()
    for fmt, (name, (n, k)), m in itertools.product(a.formats, GEMM_SHAPES.items(), a.rows):
        w = _weight(fmt, n, k)
        measured.add(w.fmt.label())
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        exact = x.float() @ w.dequantize(torch.float32).t()
        gemm_us = timed(lambda: QM.gemm(x, w), 10)
        best = None
        for cfg in _tiles(m):
            if not QA.applies(w, m, cfg):
                continue
            try:
                y = QA.matmul(x, w, cfg)
            except Exception as e:  # out of resources: skipped
                print(f"  {cfg}: {type(e).__name__}: {str(e)[:100]}", flush=True)
                continue
            if float((y.float() - exact).norm() / exact.norm()) > 2e-2:
                print(f"  {cfg}: WRONG", flush=True)
                continue
            us = timed(lambda: QA.matmul(x, w, cfg), 10)
            if best is None or us < best[0]:
                best = (us, cfg)
        floor = w.nbytes / bw * 1e6
        a8_us = best[0] if best else float("nan")
        print(f"{fmt:9s} {name:8s} {m:3d} {floor:6.1f} {gemm_us:7.1f} {a8_us:7.1f}  {tuple(best[1]) if best else '-'}",
              flush=True)
        # a null tile where the GEMM won: that shape, and the shapes that would borrow its entry
        # (quant_tiles.lookup's nearest N: the LM head), stay on the GEMM
        win = bool(best) and best[0] < 0.97 * gemm_us
        winners.append(dict(kind="a8", fmt=w.fmt.label(), n=n, k=k, m=m, tile=list(best[1]) if win else None))
        del w
    if a.out:
        from merge_tiles import merge, write

        from localsgl_kernels.quant_tiles import _entries

        timed_rows = [dict(kind="a8", label=lbl, m=m) for lbl in measured for m in a.rows]
        write(a.out, merge([dict(e) for e in _entries(torch.cuda.current_device(), None)], timed_rows, winners))
        tiles = sum(e["tile"] is not None for e in winners)
        print(f"{tiles} a8 tiles, {len(winners) - tiles} shapes left to the GEMM -> {a.out}")


if __name__ == "__main__":
    main()
