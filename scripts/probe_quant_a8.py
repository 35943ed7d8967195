"""The int4 x int8-activation GEMM (kernels/quant_a8.py) against the GEMM's tuned tile
(quant_gemm), per Llama-3.1-8B shape at 16 and 64 rows, kernels alone in CUDA graphs (the a8
time includes its activations' preparation); then writes this GPU's tuned file with an "a8"
entry for each (shape, rows): its best tile where it beat the GEMM by 3 % or more, else a null tile
(the GEMM there, and for the shapes that borrow that entry: quant_tiles.lookup).
scripts/probe_route.py holds the sweep.

    python scripts/probe_quant_a8.py [--formats int4g128] [--out TUNED.json] [--jobs 16]

``--out``: kernels/tuned/<GPU>.json's entries with the winners added (LOCALSGL_QUANT_TILES=TUNED.json
makes the engine use them)."""
from __future__ import annotations

import argparse
import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from probe_route import sweep  # noqa: E402

from localsgl_kernels import quant_a8 as QA  # noqa: E402
from localsgl_kernels import quant_gemm as QM  # noqa: E402

TILES = [QA.Config(bm, bn, warps, stages, swap, split)
         for bm, bn, warps, stages, swap, split in itertools.product(
             (16, 32, 64), (64, 128, 256), (4, 8), (2, 3, 4), (0, 1), (1, 2, 4))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", nargs="*", default=["int4g128"])
    ap.add_argument("--rows", nargs="*", type=int, default=[16, 64], choices=range(16, 65), metavar="16..64")
    ap.add_argument("--out", default=None)
    ap.add_argument("--jobs", type=int, default=16)
    ap.add_argument("--warm", action="store_true", help="time each weight alone, from L2 where it fits "
                    "(probe_route.sweep)")
    a = ap.parse_args()
    sweep("a8", "localsgl_kernels.quant_a8", a.formats, sorted({QM.tuned_rows(r) for r in a.rows}),
          lambda m: [c for c in TILES if c.block_m <= m], a.out, a.jobs, a.warm)


if __name__ == "__main__":
    main()
