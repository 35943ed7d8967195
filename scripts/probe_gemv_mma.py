"""Device probe (not a benchmark): fp8 e4m3 batch-1 GEMVs on the tensor cores (kernels/gemv_mma.py)
against gemv.py's CUDA-core kernels with their default tiles, Llama-3.1-8B shapes, 32 layers of
distinct weights (the L2 cannot hold them) replayed in one CUDA graph; µs for 32 layers and TB/s.

    python scripts/probe_gemv_mma.py

q/k/v is timed as a plain GEMV on both sides (the engine fuses it with the norm and rotary)."""
from __future__ import annotations

import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from probe_gemv import timed_graph  # noqa: E402

from localsgl_kernels import gemv as G  # noqa: E402
from localsgl_kernels import gemv_mma as M  # noqa: E402
from localsgl_kernels.compile_ahead import compile_only  # noqa: E402

L, H, I, V = 32, 4096, 14336, 128256
SHAPES = {"qkv": (6144, H), "o": (H, H), "gate_up": (2 * I, H), "down": (H, I), "lm": (V, H)}


def main() -> None:
    torch.manual_seed(0)
    W = {k: torch.randn(1 if k == "lm" else L, n, kk, device="cuda").to(torch.float8_e4m3fn) for k, (n, kk) in SHAPES.items()}
    S = {k: torch.full((n,), 0.02, device="cuda") for k, (n, _) in SHAPES.items()}
    x = torch.randn(1, H, device="cuda", dtype=torch.bfloat16)
    xi = torch.randn(1, I, device="cuda", dtype=torch.bfloat16)
    nw = torch.ones(H, device="cuda", dtype=torch.bfloat16)
    layers = {k: (1 if k == "lm" else L) for k in SHAPES}

    def xin(k):
        return xi if k == "down" else x

    def ours(k, cfg, n=None):
        n = n or layers[k]
        if k == "gate_up":
            return lambda: [M.norm_gate_up(x, x, nw, 1e-5, W[k][i], S[k], cfg) for i in range(n)]
        return lambda: [M.gemv(xin(k), W[k][i], S[k], cfg) for i in range(n)]

    def today(k):
        if k == "gate_up":
            return lambda: [G.norm_gate_up(x, x, nw, 1e-5, W[k][i], scales=S[k]) for i in range(L)]
        kind = "lm_head" if k == "lm" else "gemv"
        return lambda: [G.gemv(xin(k), W[k][i], scales=S[k], kind=kind) for i in range(layers[k])]

    grid = [M.Config(bn, bk, 4, st, sp) for bn, bk, st, sp in itertools.product((32, 64, 128), (64, 128, 256), (3, 4), (1, 2, 4, 8))]
    todo = [(k, c) for k in SHAPES for c in grid if M.applies(W[k][0], S[k], c, SHAPES[k][0] // 2 if k == "gate_up" else None)
            and not (k == "gate_up" and c.split_k > 1)]
    with compile_only():
        for k, c in todo:
            try:
                ours(k, c, 1)()
            except Exception:  # noqa: BLE001 - reported when timed
                pass
    best = {}
    for k in SHAPES:
        n, kk = SHAPES[k]
        nbytes = n * kk * (L if k != "lm" else 1)
        scale = L if k == "lm" else 1
        t = timed_graph(today(k)) * scale
        print(f"{k:8s} gemv.py default          {t:9.1f} us / 32 layers  {nbytes * scale / t / 1e6:6.3f} TB/s", flush=True)
        best[k] = [t, None, None]
        for kk_, c in todo:
            if kk_ != k:
                continue
            try:
                u = timed_graph(ours(k, c)) * scale
            except Exception as e:  # noqa: BLE001
                print(f"{k:8s} {tuple(c)} failed: {type(e).__name__}: {str(e)[:100]}", flush=True)
                continue
            print(f"{k:8s} mma {str(tuple(c)):20s} {u:9.1f} us / 32 layers  {nbytes * scale / u / 1e6:6.3f} TB/s", flush=True)
            if best[k][1] is None or u < best[k][1]:
                best[k][1:] = [u, c]
    print("\nbest per projection (us / 32 layers): gemv.py default, tensor cores best, its error against fp64")
    for k, (t, u, c) in best.items():
        err = float("nan")
        if c is not None:  # layer 0's output against the fp64 product over the same e4m3 values
            w64 = W[k][0].double() * S[k].double()[:, None]
            if k == "gate_up":
                ref, _ = G.norm_gate_up_ref(x.double(), x.double(), nw.double(), 1e-5, w64)
                y = M.norm_gate_up(x, x, nw, 1e-5, W[k][0], S[k], c)[0]
            else:
                ref, y = xin(k).double() @ w64.t(), M.gemv(xin(k), W[k][0], S[k], c, out_dtype=torch.float32)
            err = float((y.double() - ref).norm() / ref.norm())
        print(f"  {k:8s} {t:9.1f} {u if u is not None else float('nan'):9.1f}  rel err {err:.1e}  {c}")


if __name__ == "__main__":
    main()
