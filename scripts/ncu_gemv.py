"""The batch-1 dense GEMVs of kernels/gemv.py at the Llama-3.1-8B shape over fp8 e4m3 (row scales) or
bf16 weights, each called a few times with its default tile, for Nsight Compute:

    ncu --clock-control none --set full -k regex:'fullk|_gemv_kernel' python3 scripts/ncu_gemv.py [--bf16]
        [--kinds qkv,gate_up,o,down]

(fp8 batch-1 decode runs these kernels: quant_gemv routes e4m3 weights with one scale per row to them.)"""
from __future__ import annotations

import argparse

import torch

from localsgl_kernels import gemv as G

H, I, HQ, HKV, D = 4096, 14336, 32, 8, 128


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--calls", type=int, default=2)
    ap.add_argument("--kinds", default="gate_up,o,down", help="of qkv, gate_up, o, down, comma-separated")
    a = ap.parse_args()
    kinds = a.kinds.split(",")
    dt = torch.bfloat16
    mk = (lambda n, k: torch.randn(n, k, device="cuda", dtype=dt) * 0.02) if a.bf16 else \
        (lambda n, k: torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn))
    sc = (lambda n: None) if a.bf16 else (lambda n: torch.full((n,), 0.02, device="cuda"))
    x = torch.randn(1, H, device="cuda", dtype=dt)
    xi = torch.randn(1, I, device="cuda", dtype=dt)
    nw = torch.ones(H, device="cuda", dtype=dt)
    wqkv, wgu, wo, wd = mk((HQ + 2 * HKV) * D, H), mk(2 * I, H), mk(H, HQ * D), mk(H, I)
    cs = torch.randn(4096, D, device="cuda")
    pos, loc = torch.tensor([300], device="cuda"), torch.tensor([7], device="cuda")
    kc, vc = (torch.zeros(16, HKV, D, device="cuda", dtype=dt) for _ in range(2))
    for _ in range(a.calls):
        if "qkv" in kinds:
            G.norm_qkv(x, x, nw, 1e-5, wqkv, None, cs, pos, loc, kc, vc, HQ, HKV, scales=sc(wqkv.shape[0]))
        if "gate_up" in kinds:
            G.norm_gate_up(x, x, nw, 1e-5, wgu, scales=sc(2 * I))
        if "o" in kinds:
            G.gemv(x, wo, scales=sc(H))
        if "down" in kinds:
            G.gemv(xi, wd, scales=sc(H))
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
