"""Device probe (not a benchmark): where fp8 batch 1's q/k/v and down_proj streams lose to their floors.

32 layers of distinct e4m3 weights (Llama-3.1-8B shapes, one scale a row), each variant replayed in one
CUDA graph (scripts/probe_gemv.py's harness), µs for the 32 layers and TB/s of weight bytes:
  * qkv: the fused kernel (norm + rotary + KV store) over tiles, with and without the residual add, and a
    plain full-K GEMV over the same weights (no norm, no rotary pairs): what the prologue and the
    epilogue cost;
  * down: the K-loop tile the engine takes against full-K tiles over K = 14336 (padded to 16384);
  * q/k/v and o_proj with the launcher's tiles and PDL off.
Ends with the fastest down full-K and qkv tiles against the launcher's.
Usage: python scripts/probe_fp8_parts.py
"""
from __future__ import annotations

import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import torch  # noqa: E402

import probe_gemv as P  # noqa: E402

P.FP8 = True  # its weights() and row_scales(): e4m3 with one scale a row


def main():
    from localsgl_kernels import gemv as G
    from localsgl_kernels import pdl
    from localsgl_kernels.compile_ahead import compile_only

    W = P.weights()
    S = P.row_scales(W)
    L, H, HQ, HKV, D, I = P.L, P.H, P.HQ, P.HKV, P.D, P.I
    t = P.one_token_inputs()
    x, r, nw, xi, cs, pos, loc, kc, vc = t.x, t.r, t.nw, t.xi, t.cs, t.pos, t.loc, t.kc, t.vc
    C = G.Config

    def qkv(cfg, res=True, n=L):
        return lambda: [G.norm_qkv(x, r if res else None, nw, 1e-5, W["qkv"][i], None, cs, pos, loc, kc, vc, HQ, HKV,
                                   config=cfg, scales=S["qkv"][i]) for i in range(n)]

    def plain(key, xin, cfg, n=L):
        return lambda: [G.gemv(xin, W[key][i], config=cfg, scales=S[key][i]) for i in range(n)]

    qkv_tiles = [None, C(4, 0, 4, 1, 16), C(2, 0, 4, 1, 16), C(2, 0, 2, 1, 16), C(4, 0, 2, 1, 16), C(4, 0, 4, 1, 8),
                 C(4, 0, 4, 1, 6), C(8, 0, 4, 1, 8), C(8, 0, 8, 1, 4), C(2, 0, 4, 1, 8)]
    plain_tiles = [C(8, 0, 4, 1, 16), C(8, 0, 4, 1, 8), C(16, 0, 4, 1, 2), C(16, 0, 4, 1, 4), C(8, 0, 4, 1, 4)]
    down_tiles = [None] + [C(rr, 0, nw_, 1, per_sm) for rr, per_sm, nw_ in
                           itertools.product((2, 4, 8), (1, 2, 3, 4, 8), (4, 8)) if rr * 16384 // (32 * nw_) <= 512]
    runs = []  # (group, tile or None for the launcher's, label, 32 layers, one layer, weights)
    for cfg in qkv_tiles:
        runs.append(("qkv", cfg, "qkv fused", qkv(cfg), qkv(cfg, n=1), W["qkv"]))
        runs.append(("qkv no residual", cfg, "qkv fused, no residual", qkv(cfg, False), qkv(cfg, False, 1), W["qkv"]))
    for cfg in plain_tiles:
        runs.append(("qkv plain", cfg, "qkv plain gemv", plain("qkv", x, cfg), plain("qkv", x, cfg, 1), W["qkv"]))
    runs.append(("o", None, "o plain gemv", plain("o", x, None), plain("o", x, None, 1), W["o"]))
    for cfg in down_tiles:
        runs.append(("down", cfg, "down", plain("down", xi, cfg), plain("down", xi, cfg, 1), W["down"]))
    with compile_only():  # every tile compiled in parallel first
        for *_, one, _ in runs:
            try:
                one()
            except Exception:  # noqa: BLE001 - reported when timed
                pass
    P.timed_graph(runs[0][3])  # the first timings of a process run cold
    res = {}
    for group, cfg, label, fn, _, w in runs:
        label = f"{label} {tuple(cfg) if cfg else 'default'}"
        try:
            us = P.timed_graph(fn)
        except Exception as e:  # noqa: BLE001
            print(f"{label}: failed {type(e).__name__}: {str(e)[:100]}", flush=True)
            continue
        res[(group, cfg)] = us
        print(f"{label:48s} {us:8.1f} us  {w.numel() / us / 1e6:6.3f} TB/s", flush=True)
    pdl.set_enabled(False)
    for label, fn, w in (("qkv fused default, PDL off", qkv(None), W["qkv"]),
                         ("o plain gemv default, PDL off", plain("o", x, None), W["o"])):
        us = P.timed_graph(fn)
        print(f"{label:48s} {us:8.1f} us  {w.numel() / us / 1e6:6.3f} TB/s", flush=True)
    pdl.set_enabled(True)
    for group, what in (("down", "K-loop (the launcher's)"), ("qkv", "the launcher's tile")):
        tiles = {cfg: us for (g, cfg), us in res.items() if g == group and cfg is not None}
        if tiles:
            best = min(tiles, key=tiles.get)
            print(f"{group}: {what} {res.get((group, None), float('nan')):.1f} us, best {tuple(best)} "
                  f"{tiles[best]:.1f} us")


if __name__ == "__main__":
    main()
