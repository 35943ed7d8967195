"""The batch-1 int4 GEMVs of the Llama-3.1-8B shape, each called a few times, for Nsight Compute:

    ncu --clock-control none --set full -k regex:'_qgemv|_qnorm|_prep|tinygemm|int4' \
        python3 scripts/ncu_quant_gemv.py [--fmt int4g128] --calls 1

(`bash scripts/device_check.sh none notests ncu` runs it so.)

Runs the engine's calls with their default (tuned) tiles: norm + gate_up (fused), down, qkv (fused),
o and the LM head, then torch's ``_weight_int4pack_mm`` on gate_up and down as a reference.  With
``--rows M`` (M > 1) the decode batch's GEMMs instead (quant_gemm.gemm on qkv, o, gate_up and down,
their default tiles; profile them with -k regex:_qgemm); with ``--rows M --a8 TILE`` (a quant_a8.Config
as comma-separated fields) quant_a8.matmul with that tile on each shape it applies to (-k regex:_a8)."""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from probe_quant_tiles import FORMATS, FUSED_SHAPES, GEMM_SHAPES, GEMV_SHAPES, _fused_call, _weight  # noqa: E402

from localsgl_kernels import quant_a8 as QA  # noqa: E402
from localsgl_kernels import quant_gemm as QM  # noqa: E402
from localsgl_kernels import quant_gemv as QV  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fmt", default="int4g128", choices=list(FORMATS))
    ap.add_argument("--calls", type=int, default=2)
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--a8", default=None, metavar="TILE")
    args = ap.parse_args()
    if args.rows > 1:
        a8 = QA.Config(*map(int, args.a8.split(","))) if args.a8 else None
        for shape, (n, k) in GEMM_SHAPES.items():
            w = _weight(args.fmt, n, k)
            x = torch.randn(args.rows, k, device="cuda", dtype=torch.bfloat16)
            if a8 is not None and not QA.applies(w, args.rows, a8):
                continue
            for _ in range(args.calls):
                QA.matmul(x, w, a8) if a8 is not None else QM.gemm(x, w)
            torch.cuda.synchronize()
            print(shape, n, k, "rows", args.rows, "tile", tuple(a8 or QM.default_config(args.rows, "cuda", w)), flush=True)
        return
    for shape, (n, k) in GEMV_SHAPES.items():
        w = _weight(args.fmt, n, k)
        xs = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        fn = _fused_call(shape, w, xs, None) if shape in FUSED_SHAPES else (lambda w=w, xs=xs: QV.gemv(xs, w))
        for _ in range(args.calls):
            fn()
        torch.cuda.synchronize()
        print(shape, n, k, "bytes", w.qweight.numel() * w.qweight.element_size(), flush=True)
    if args.fmt.startswith("int4"):
        group = FORMATS[args.fmt].group_size
        for n, k in (GEMV_SHAPES["gate_up"], GEMV_SHAPES["down"]):
            nibbles = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
            packed = torch._convert_weight_to_int4pack(nibbles, 8)
            sz = torch.randn(k // group, n, 2, device="cuda", dtype=torch.bfloat16)
            xk = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            for _ in range(args.calls):
                torch._weight_int4pack_mm(xk, packed, group, sz)
            torch.cuda.synchronize()


if __name__ == "__main__":
    main()
