"""Device probe (not a benchmark): o_proj and norm_gate_up as one launch with a grid barrier
(kernels/gemv_chain.py) against the two launches it replaces, over tiles.

32 layers of distinct weights (Llama-3.1-8B shapes; e4m3 with one scale a row, then bf16), each
variant replayed in one CUDA graph with PDL (scripts/probe_gemv.py's harness), µs for the 32 layers:
  * "apart": gemv(o_proj) -> norm_gate_up -> gemv(down_proj), the launchers' tiles;
  * "chain <tile>": o_norm_gate_up(tile) -> gemv(down_proj), each tile with the grid it got (0: the
    driver said its programs are not all resident at once, so it ran as two launches).
Also the chain's output against the two launches' on one layer (max relative difference).
Usage: python scripts/probe_chain.py [fp8|bf16 ...]
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import torch  # noqa: E402

import probe_gemv as P  # noqa: E402


def probe(fmt: str):
    from localsgl_kernels import gemv as G
    from localsgl_kernels import gemv_chain as C
    from localsgl_kernels.compile_ahead import compile_only

    P.FP8 = fmt == "fp8"
    W = P.weights()
    S = P.row_scales(W)
    L, H, I = P.L, P.H, P.I
    dt = P.DT
    a = torch.randn(1, H, device="cuda", dtype=dt)
    r = torch.randn(1, H, device="cuda", dtype=dt)
    nw = torch.ones(H, device="cuda", dtype=dt)
    bar = C.new_barrier("cuda")
    CC = C.ChainConfig

    def apart(down=True, n=L):
        def run():
            for i in range(n):
                h = G.gemv(a, W["o"][i], scales=S["o"][i])
                x, _ = G.norm_gate_up(h, r, nw, 1e-5, W["gate_up"][i], scales=S["gate_up"][i])
                if down:
                    G.gemv(x, W["down"][i], scales=S["down"][i])
        return run

    def chain(cfg, down=True, n=L):
        def run():
            for i in range(n):
                x, _ = C.o_norm_gate_up(a, W["o"][i], r, nw, 1e-5, W["gate_up"][i], bar, cfg=cfg,
                                        scales_o=S["o"][i], scales=S["gate_up"][i])
                if down:
                    G.gemv(x, W["down"][i], scales=S["down"][i])
        return run

    elem = 1 if P.FP8 else 2
    if P.FP8:
        tiles = [CC(8, 4, 4, 4), CC(4, 4, 4, 4), CC(16, 4, 4, 4), CC(8, 4, 2, 4), CC(8, 8, 2, 4),
                 CC(8, 4, 2, 8), CC(8, 4, 3, 8), CC(8, 8, 2, 8), CC(16, 8, 2, 8), CC(4, 4, 8, 2), CC(8, 2, 8, 2)]
    else:
        tiles = [CC(4, 4, 2, 8), CC(4, 4, 4, 4), CC(4, 2, 4, 4), CC(8, 4, 2, 8), CC(4, 4, 3, 4), CC(4, 2, 8, 2),
                 CC(2, 2, 8, 4)]
    assert C.config(H, H, I, H, "cuda", elem) == tiles[0]
    runs = [("apart", apart(), apart(n=1)), ("apart, no down", apart(False), apart(False, 1))]
    for cfg in tiles:
        runs += [(f"chain {tuple(cfg)}", chain(cfg), chain(cfg, n=1)),
                 (f"chain {tuple(cfg)}, no down", chain(cfg, False), chain(cfg, False, 1))]
    with compile_only():  # one layer of each, compiled in parallel
        for _, _, one in runs:
            try:
                one()
            except Exception:  # noqa: BLE001 - reported when timed
                pass
    # one layer: the chain against the two launches
    h = G.gemv(a, W["o"][0], scales=S["o"][0])
    ref, rref = G.norm_gate_up(h, r, nw, 1e-5, W["gate_up"][0], scales=S["gate_up"][0])
    got, rgot = C.o_norm_gate_up(a, W["o"][0], r, nw, 1e-5, W["gate_up"][0], bar, scales_o=S["o"][0],
                                 scales=S["gate_up"][0])
    diff = float((got.float() - ref.float()).norm() / ref.float().norm())
    print(f"{fmt}: chain vs apart, one layer: rel diff {diff:.2e}, residual equal {torch.equal(rgot, rref)}",
          flush=True)
    P.timed_graph(runs[0][1])  # the first timings of a process run cold
    for label, fn, _ in runs:
        try:
            us = P.timed_graph(fn)
        except Exception as e:  # noqa: BLE001
            print(f"{fmt} {label}: failed {type(e).__name__}: {str(e)[:120]}", flush=True)
            continue
        grids = {k[1]: g for k, g in C._GRIDS.items()}
        grid = next((g for cfg, g in grids.items() if label.startswith(f"chain {tuple(cfg)}")), "")
        print(f"{fmt} {label:36s} {us:8.1f} us  grid {grid}", flush=True)
    del W, S
    torch.cuda.empty_cache()


if __name__ == "__main__":
    for fmt in [f for f in sys.argv[1:] if f in ("fp8", "bf16")] or ["fp8", "bf16"]:
        probe(fmt)
