"""Device probe (not a benchmark): two weight streams as one launch with a grid barrier
(kernels/gemv_chain.py) against the launches they replace, over tiles.

32 layers of distinct weights (Llama-3.1-8B shapes; e4m3 with one scale a row, then bf16), each
variant replayed in one CUDA graph with PDL (scripts/probe_gemv.py's harness), µs for the 32 layers
of weight streams (no attention):
  * "apart": norm_qkv, gemv(o_proj), norm_gate_up, gemv(down_proj), the launchers' tiles;
  * "o_gate_up <tile>": o_norm_gate_up in place of o_proj and norm_gate_up;
  * "both, down_qkv <tile>": and down_norm_qkv in place of a down_proj and the next layer's norm_qkv;
each chain tile with the grid it got (0: the driver said its programs are not all resident at once,
so it ran as two launches).  Also each chain's output against the launches it replaces, one layer.
Usage: python scripts/probe_chain.py [fp8|bf16 ...]   (CHAIN_TILES=N: the first N tiles of each chain)
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
    L, H, HQ, HKV, D, I = P.L, P.H, P.HQ, P.HKV, P.D, P.I
    t = P.one_token_inputs()
    x, r, nw, xi, cs, pos, loc, kc, vc = t.x, t.r, t.nw, t.xi, t.cs, t.pos, t.loc, t.kc, t.vc
    bars = (C.new_barrier("cuda"), C.new_barrier("cuda"))
    CC = C.ChainConfig

    def qkv(i):
        return G.norm_qkv(x, r, nw, 1e-5, W["qkv"][i], None, cs, pos, loc, kc, vc, HQ, HKV, scales=S["qkv"][i])

    def o_gate_up(i, cfg=None):
        if cfg is False:
            h = G.gemv(x, W["o"][i], scales=S["o"][i])
            return G.norm_gate_up(h, r, nw, 1e-5, W["gate_up"][i], scales=S["gate_up"][i])
        return C.o_norm_gate_up(x, W["o"][i], r, nw, 1e-5, W["gate_up"][i], bars[0], cfg=cfg, scales_o=S["o"][i],
                                scales=S["gate_up"][i])

    def down_qkv(i, cfg=None):
        return C.down_norm_qkv(xi, W["down"][i - 1], r, nw, 1e-5, W["qkv"][i], None, cs, pos, loc, kc, vc, HQ, HKV,
                               bars[1], cfg=cfg, scales_d=S["down"][i - 1], scales=S["qkv"][i])

    def layers(og=False, dq=False, n=L):
        """og: o_gate_up's tile (None: its default; False: apart); dq: down_qkv's (False: apart)."""
        def run():
            for i in range(n):
                if dq is not False and i > 0:
                    down_qkv(i, dq)
                else:
                    qkv(i)
                o_gate_up(i, og)
                if dq is False or i == n - 1:
                    G.gemv(xi, W["down"][i], scales=S["down"][i])
        return run

    elem = 1 if P.FP8 else 2
    if P.FP8:
        og_tiles = [CC(8, 4, 4, 4), CC(4, 4, 4, 4), CC(16, 4, 4, 4), CC(8, 4, 2, 4), CC(8, 8, 2, 4), CC(8, 4, 2, 8),
                    CC(8, 4, 3, 8), CC(8, 8, 2, 8), CC(16, 8, 2, 8), CC(4, 4, 8, 2)]
        dq_tiles = [CC(8, 4, 4, 4, 1024), CC(4, 4, 4, 4, 1024), CC(16, 4, 4, 4, 512), CC(8, 4, 2, 8, 1024),
                    CC(16, 4, 2, 8, 1024), CC(8, 8, 2, 8, 1024), CC(4, 4, 8, 2, 512)]
    else:
        og_tiles = [CC(4, 4, 2, 8), CC(4, 4, 4, 4), CC(4, 2, 4, 4), CC(8, 4, 2, 8), CC(4, 4, 3, 4), CC(4, 2, 8, 2)]
        dq_tiles = [CC(8, 4, 2, 8, 512), CC(4, 4, 4, 4, 512), CC(16, 4, 2, 8, 256), CC(8, 2, 4, 4, 512)]
    assert C.config("o_gate_up", (H, H), I, H, "cuda", elem) == og_tiles[0]
    assert C.config("down_qkv", (H, I), D // 2, H, "cuda", elem) == dq_tiles[0]
    n_tiles = int(os.environ.get("CHAIN_TILES", "0")) or None  # the first few of each list (a short lease)
    og_tiles, dq_tiles = og_tiles[:n_tiles], dq_tiles[:n_tiles]
    runs = [("apart", False, False)]
    runs += [(f"o_gate_up {tuple(t)}", t, False) for t in og_tiles]
    runs += [(f"both, down_qkv {tuple(t)}", None, t) for t in dq_tiles]
    with compile_only():  # one layer pair of each, compiled in parallel
        for _, og, dq in runs:
            try:
                layers(og, dq, 2)()
            except Exception:  # noqa: BLE001 - reported when timed
                pass
    # one layer: each chain against the launches it replaces
    ref, rref = o_gate_up(0, False)
    got, rgot = o_gate_up(0)
    print(f"{fmt}: o_gate_up vs apart: rel diff {float((got.float() - ref.float()).norm() / ref.float().norm()):.2e}, "
          f"residual equal {torch.equal(rgot, rref)}", flush=True)
    q_ref, rq_ref = G.norm_qkv(G.gemv(xi, W["down"][0], scales=S["down"][0]), r, nw, 1e-5, W["qkv"][1], None, cs, pos,
                               loc, kc, vc, HQ, HKV, scales=S["qkv"][1])
    q_got, rq_got = down_qkv(1)
    print(f"{fmt}: down_qkv vs apart: rel diff "
          f"{float((q_got.float() - q_ref.float()).norm() / q_ref.float().norm()):.2e}, "
          f"residual equal {torch.equal(rq_got, rq_ref)}", flush=True)
    P.timed_graph(layers())  # the first timings of a process run cold
    sms = C._sms(torch.device("cuda"))
    for label, og, dq in runs:
        try:
            us = P.timed_graph(layers(og, dq))
        except Exception as e:  # noqa: BLE001
            print(f"{fmt} {label}: failed {type(e).__name__}: {str(e)[:120]}", flush=True)
            continue
        tile = dq if dq is not False else og
        grid = next((g for k, g in C._GRIDS.items() if tile and k[2] == tile), "")
        per_sm = f" ({grid / sms:.2f} a SM)" if grid else ""
        print(f"{fmt} {label:40s} {us:8.1f} us  grid {grid}{per_sm}", flush=True)
    C.COOPERATIVE = False  # the same grids launched without the cooperative attribute
    C._GRIDS.clear()
    for label, og, dq in runs[:2] + runs[-len(dq_tiles):-len(dq_tiles) + 1]:
        print(f"{fmt} {label + ', not cooperative':40s} {P.timed_graph(layers(og, dq)):8.1f} us", flush=True)
    C.COOPERATIVE = True
    del W, S
    torch.cuda.empty_cache()


if __name__ == "__main__":
    for fmt in [f for f in sys.argv[1:] if f in ("fp8", "bf16")] or ["fp8", "bf16"]:
        probe(fmt)
