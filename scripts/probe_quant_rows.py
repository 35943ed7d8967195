"""The few-row matmul (kernels/quant_rows.py) against the route 2..8 rows take without it (the
16-row GEMM tile of quant_gemm), per weight format, Llama-3.1-8B shape and row count (2, 4, 8),
kernels alone in CUDA graphs; then writes this GPU's tuned file with a "rows" entry for each
(format, shape, rows): its best tile where it beat the GEMM by 3 % or more, else a null tile (the
GEMM there, and for the shapes that borrow that entry: quant_tiles.lookup).  scripts/probe_route.py
holds the sweep.

    python scripts/probe_quant_rows.py [--formats int4g128 int4g32 int8g16] [--out TUNED.json] [--jobs 16]

``--out``: kernels/tuned/<GPU>.json's entries with the winners added (LOCALSGL_QUANT_TILES=TUNED.json
makes the engine use them)."""
from __future__ import annotations

import argparse
import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from probe_quant_tiles import FORMATS  # noqa: E402
from probe_route import sweep  # noqa: E402

from localsgl_kernels import quant_rows as QR  # noqa: E402

# 1-3 stages: the weight words 0-2 steps ahead; 32-row blocks, which no tuned rows entry (H100, H200) has, are left
# out so that three formats fit tune_tiles.sh's time per probe
TILES = [QR.Config(r, bk, warps, stages)
         for r, bk, warps, stages in itertools.product((4, 8, 16), (256, 512, 1024, 2048), (4, 8), (1, 2, 3))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", nargs="*", default=["int4g128", "int4g32", "int8g16"], choices=list(FORMATS))
    ap.add_argument("--rows", nargs="*", type=int, default=[2, 4, 8])
    ap.add_argument("--out", default=None)
    ap.add_argument("--jobs", type=int, default=16)
    ap.add_argument("--warm", action="store_true", help="time each weight alone, from L2 where it fits "
                    "(probe_route.sweep)")
    a = ap.parse_args()
    buckets = sorted({QR._bucket(r) for r in a.rows})  # the row counts the tuned file's entries name
    sweep("rows", "localsgl_kernels.quant_rows", a.formats, buckets, lambda m: TILES, a.out, a.jobs, a.warm)


if __name__ == "__main__":
    main()
