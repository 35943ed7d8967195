"""int4 g128 matmuls at 1-64 rows on the GPU, µs per call (CUDA graphs): the engine's route
(quant_gemm.matmul with the tuned tiles), torch's tinygemm (``_weight_int4pack_mm``, tensor
cores, its own pre-swizzled layout) and bf16 cuBLAS on the same Llama-3.1-8B shapes, beside the
packed bytes' floor.  It answers one question: whether tinygemm would take the few-row and
64-row decode batches from the Triton GEMM (the int4 batch-64 target is ~0.9x our bf16).

    python scripts/probe_int4pack_rows.py [--rows 1 4 16 64]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from probe_quant import copy_bandwidth, timed  # noqa: E402
from probe_quant_tiles import FORMATS, GEMM_SHAPES, _weight  # noqa: E402

from localsgl_kernels import quant_gemm as QM  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64])
    args = ap.parse_args()
    bw = copy_bandwidth()
    group = FORMATS["int4g128"].group_size
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    print(f"{'shape':8s} {'M':>3s} {'floor':>7s} {'engine':>8s} {'tinygemm':>9s} {'bf16':>8s}")
    for name, (n, k) in GEMM_SHAPES.items():
        w = _weight("int4g128", n, k)
        packed = torch._convert_weight_to_int4pack(torch.randint(0, 256, (n, k // 2), dtype=torch.uint8,
                                                                 device="cuda"), 8)
        sz = torch.randn(k // group, n, 2, device="cuda", dtype=torch.bfloat16)
        dense = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        for m in args.rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            floor = (n * k / 2 + n * k / group * 4 + m * k * 2) / bw * 1e6
            ours = timed(lambda: QM.matmul(x, w), 10)
            try:
                tiny = f"{timed(lambda: torch._weight_int4pack_mm(x, packed, group, sz), 10):9.1f}"
            except Exception as e:  # noqa: BLE001
                tiny = f"{type(e).__name__}"
            cub = timed(lambda: x @ dense.t(), 10)
            print(f"{name:8s} {m:3d} {floor:7.1f} {ours:8.1f} {tiny:>9s} {cub:8.1f}", flush=True)
        del w, packed, sz, dense


if __name__ == "__main__":
    main()
