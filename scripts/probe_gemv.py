"""Device probe (not a benchmark): the batch-1 weight streams of Llama-3.1-8B, 32 layers of
distinct random bf16 weights (so the L2 cannot hold them), each variant replayed in one
CUDA graph.

  1. cuBLAS (F.linear, M = 1) vs the Triton kernels of kernels/gemv.py over a grid of tiles,
     per projection: the µs for 32 layers and the TB/s;
  2. the layer sequence without attention: the unfused chain (9 launches per layer) vs the
     fused one (4), and fused with cuBLAS for o/down.
Usage: python scripts/probe_gemv.py [tiles|layers] ... [kloop] [short|resident|pdl2|fp8]  (kloop: sweep K-loop tiles instead of full-K; short: 6 full-K tiles;
       resident: 1-16 programs per SM, 4 or 8 warps; pdl2: 2-4 row full-K tiles, down's K-loop tiles;
       fp8: the tiles over e4m3 weights with one scale per row, as quant_gemv routes an fp8 model's batch-1
       GEMVs here: full-K 4-16 rows, 1-16 programs per SM, and K-loop tiles 4-16 rows x 512-2048 columns;
       no cuBLAS column; fp8 f32: the same with the full-K tiles' fp32 products instead of their e4m3 x fp16 ones,
       gemv_tiles.E4M3_FP16 off)
"""
from __future__ import annotations

import itertools
import sys

import torch
import torch.nn.functional as F

L, H, HQ, HKV, D, I, V = 32, 4096, 32, 8, 128, 14336, 128256
DT = torch.bfloat16


def capture_graph(fn) -> torch.cuda.CUDAGraph:
    """``fn`` captured in a CUDA graph, after one warm-up call on a side stream."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def timed_graph(fn, reps=20):
    return time_calls(capture_graph(fn).replay, reps)  # µs per replay


def time_calls(fn, reps=20):
    """µs per call of ``fn`` (after one warm-up call), by CUDA events around ``reps`` calls."""
    fn()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(reps):
        fn()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) * 1e3 / reps


FP8 = "fp8" in sys.argv


def weights():
    torch.manual_seed(0)
    if FP8:  # e4m3 values with one fp32 scale per row (the scales' values do not change the timing)
        mk = lambda n, k: torch.randn(L, n, k, device="cuda").to(torch.float8_e4m3fn)  # noqa: E731
        lm = torch.randn(V, H, device="cuda").to(torch.float8_e4m3fn)
    else:
        mk = lambda n, k: torch.randn(L, n, k, device="cuda", dtype=DT) * 0.02  # noqa: E731
        lm = torch.randn(V, H, device="cuda", dtype=DT) * 0.02
    return {"qkv": mk((HQ + 2 * HKV) * D, H), "o": mk(H, HQ * D), "gate_up": mk(2 * I, H), "down": mk(H, I), "lm": lm}


def row_scales(W):
    """Per weight, its per-layer row scales (fp8) or Nones."""
    if not FP8:  # the LM head is one weight, not one a layer
        return {k: None if k == "lm" else [None] * L for k in W}
    return {k: (torch.full((w.shape[-2],), 0.02, device="cuda") if k == "lm"
                else torch.full((L, w.shape[-2]), 0.02, device="cuda")) for k, w in W.items()}


def one_token_inputs():
    """A batch-1 step's activations and q/k/v arguments for the probes (values do not change timings):
    x, the residual r, norm weight nw [1, H]; xi [1, I] (down_proj's input); cos/sin, position, slot,
    and a 16-slot K/V pool."""
    from types import SimpleNamespace

    return SimpleNamespace(
        x=torch.randn(1, H, device="cuda", dtype=DT), r=torch.randn(1, H, device="cuda", dtype=DT),
        nw=torch.ones(H, device="cuda", dtype=DT), xi=torch.randn(1, I, device="cuda", dtype=DT),
        cs=torch.randn(4096, D, device="cuda"), pos=torch.tensor([300], device="cuda"),
        loc=torch.tensor([7], device="cuda"), kc=torch.zeros(16, HKV, D, device="cuda", dtype=DT),
        vc=torch.zeros(16, HKV, D, device="cuda", dtype=DT))


def probe_tiles(W):
    from localsgl_kernels import gemv as G

    t = one_token_inputs()
    x, r, nw, xi, cs, pos, loc, kc, vc = t.x, t.r, t.nw, t.xi, t.cs, t.pos, t.loc, t.kc, t.vc
    res = {}

    def report(name, us, nbytes):
        print(f"{name:44s} {us:9.1f} us / 32 layers  {nbytes / us / 1e6:6.3f} TB/s", flush=True)
        return us

    S = row_scales(W)
    for key in () if FP8 else ("qkv", "o", "gate_up", "down"):  # cuBLAS has no e4m3 GEMV to compare with
        w = W[key]
        xin = xi if key == "down" else x
        nbytes = w.numel() * 2
        res[(key, "cublas")] = report(f"{key} cublas", timed_graph(lambda: [F.linear(xin, w[i]) for i in range(L)]), nbytes)
    if not FP8:
        res[("lm", "cublas")] = report("lm cublas (+ .float())", timed_graph(lambda: F.linear(x, W["lm"]).float(), 20) * L,
                                       W["lm"].numel() * 2 * L)
    if FP8:  # full-K tiles for every stream (down's K too) and K-loop tiles
        grid = [G.Config(rr, 0, nw_, 1, per_sm) for rr, per_sm, nw_ in itertools.product((4, 8, 16), (1, 2, 3, 4, 16), (4, 8))]
        grid += [G.Config(rr, bk, nw_, 1) for rr, bk, nw_ in itertools.product((4, 8, 16), (512, 1024, 2048), (4, 8))]
    elif "kloop" in sys.argv:  # the K-loop tile sweep (RESULTS.md: "fused weight streams")
        grid = [G.Config(rr, kk, nw_, st) for rr, kk, nw_, st in itertools.product((2, 4, 8), (256, 512, 1024), (4, 8), (1,))]
        grid += [G.Config(4, 512, 4, 3), G.Config(8, 256, 4, 3), G.Config(2, 1024, 4, 3), G.Config(1, 1024, 4, 1),
                 G.Config(1, 2048, 8, 1), G.Config(16, 256, 8, 1)]
    else:  # full-K tiles: rows per block, programs per SM, warps (down_proj's K does not fit them)
        grid = [G.Config(rr, 0, nw_, 1, per_sm) for rr, per_sm, nw_ in itertools.product((2, 4, 8), (4, 8, 16), (8, 16))
                if "short" not in sys.argv or (nw_ == 8 and per_sm in (4, 16))]
        if "pdl2" in sys.argv:  # full-K 2 or 4 rows for the K <= 8192 streams; K-loop tiles for down
            grid = [G.Config(rr, 0, nw_, 1, per_sm) for rr, per_sm, nw_ in itertools.product((2, 4), (2, 4, 16), (8, 16))]
            grid += [G.Config(rr, bk, nw_, 1) for rr, bk, nw_ in ((8, 1024, 8), (4, 1024, 8), (8, 512, 8), (4, 512, 4))]
        if "resident" in sys.argv:  # fewer resident programs, so a PDL successor finds room to prefetch
            grid = [G.Config(rr, 0, nw_, 1, per_sm) for rr, per_sm, nw_ in itertools.product((4, 8), (1, 2, 4, 16), (4, 8))]
    def runs_for(cfg, layers=L):
        e = W["qkv"].element_size()
        return {
            "qkv": (lambda: [G.norm_qkv(x, r, nw, 1e-5, W["qkv"][i], None, cs, pos, loc, kc, vc, HQ, HKV, config=cfg,
                                        scales=S["qkv"][i]) for i in range(layers)], "qkv fused", W["qkv"].numel() * e, 1),
            "gate_up": (lambda: [G.norm_gate_up(x, r, nw, 1e-5, W["gate_up"][i], config=cfg, scales=S["gate_up"][i])
                                 for i in range(layers)], "gate_up fused", W["gate_up"].numel() * e, 1),
            "o": (lambda: [G.gemv(x, W["o"][i], config=cfg, scales=S["o"][i]) for i in range(layers)], "o gemv",
                  W["o"].numel() * e, 1),
            "down": (lambda: [G.gemv(xi, W["down"][i], config=cfg, scales=S["down"][i]) for i in range(layers)],
                     "down gemv", W["down"].numel() * e, 1),
            "lm": (lambda: G.gemv(x, W["lm"], out_dtype=torch.float32, config=cfg, kind="lm_head", scales=S["lm"]),
                   "lm gemv fp32 out", W["lm"].numel() * e * L, L),
        }

    def skip(cfg, key):
        if "pdl2" in sys.argv and (cfg.programs_per_sm == 0) != (key == "down"):
            return True
        return False

    if FP8:  # compile every tile in parallel first (a dry pass of one layer each), then time today's tiles
        from localsgl_kernels.compile_ahead import compile_only

        with compile_only():
            for cfg in grid:
                for key, (fn, *_rest) in runs_for(cfg, 1).items():
                    if not skip(cfg, key):
                        try:
                            fn()
                        except Exception:  # noqa: BLE001 - reported when timed
                            pass
        for key, (fn, label, nbytes, scale) in runs_for(None).items():
            res[(key, "default")] = report(f"{label} default", timed_graph(fn) * scale, nbytes)
    for cfg in grid:
        runs = runs_for(cfg)
        for key, (fn, label, nbytes, scale) in runs.items():
            if skip(cfg, key):
                continue
            try:
                res[(key, cfg)] = report(f"{label} {tuple(cfg)}", timed_graph(fn) * scale, nbytes)
            except Exception as e:  # a tile that does not compile, fit or apply to this shape: skip it
                print(f"{label} {tuple(cfg)} failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
    if FP8:  # today's tiles again, warm: the first timings of a process run cold
        for key, (fn, label, nbytes, scale) in runs_for(None).items():
            res[(key, "default")] = report(f"{label} default (again)", timed_graph(fn) * scale, nbytes)
    print("\nbest per projection (us / 32 layers):")
    for key in ("qkv", "o", "gate_up", "down", "lm"):
        cands = [(us, c) for (k, c), us in res.items() if k == key and c not in ("cublas", "default")]
        if cands:
            us, c = min(cands, key=lambda t: t[0])
            base = f"cublas {res[(key, 'cublas')]:8.1f}" if (key, "cublas") in res else ""
            default = f"default {res[(key, 'default')]:8.1f}" if (key, "default") in res else ""
            print(f"  {key:8s} {base}{default}   triton best {us:8.1f} {c}")


def probe_layers(W):
    from localsgl_kernels import gemv as G
    from localsgl_kernels.activation import silu_and_mul
    from localsgl_kernels.kv_store import store_kv
    from localsgl_kernels.rmsnorm import fused_add_rmsnorm
    from localsgl_kernels.rotary import apply_rotary

    t = one_token_inputs()
    x0, nw, cs, pos, loc, kc, vc = t.x, t.nw, t.cs, t.pos, t.loc, t.kc, t.vc
    total = sum(W[k].numel() for k in ("qkv", "o", "gate_up", "down")) * 2

    def unfused():
        x, res = x0, x0.clone()
        for i in range(L):
            h, res = fused_add_rmsnorm(x, res, nw, 1e-5)
            qkv = F.linear(h, W["qkv"][i])
            q, k, v = qkv.split([HQ * D, HKV * D, HKV * D], dim=-1)
            q, k = apply_rotary(q.view(1, HQ, D), k.view(1, HKV, D), pos, cs)
            store_kv(kc, vc, loc, k, v.view(1, HKV, D))
            h = F.linear(q.reshape(1, HQ * D), W["o"][i])
            h, res = fused_add_rmsnorm(h, res, nw, 1e-5)
            x = F.linear(silu_and_mul(F.linear(h, W["gate_up"][i])), W["down"][i])

    def fused(cublas_od: bool):
        def run():
            x, res = x0, x0.clone()
            for i in range(L):
                q, res = G.norm_qkv(x, res, nw, 1e-5, W["qkv"][i], None, cs, pos, loc, kc, vc, HQ, HKV)
                o = q.view(1, HQ * D)
                h = F.linear(o, W["o"][i]) if cublas_od else G.gemv(o, W["o"][i])
                a, res = G.norm_gate_up(h, res, nw, 1e-5, W["gate_up"][i])
                x = F.linear(a, W["down"][i]) if cublas_od else G.gemv(a, W["down"][i])
        return run

    from localsgl_kernels import pdl

    for name, fn, use_pdl in (("unfused (9 launches/layer)", unfused, True),
                              ("fused (4 launches/layer)", fused(False), True),
                              ("fused, PDL off", fused(False), False),
                              ("fused qkv+gate_up, cuBLAS o/down", fused(True), True)):
        pdl.set_enabled(use_pdl)
        us = timed_graph(fn)
        print(f"layers {name:36s} {us:9.1f} us / token  {total / us / 1e6:6.3f} TB/s", flush=True)
    pdl.set_enabled(True)


if __name__ == "__main__":
    what = [a for a in sys.argv[1:] if a not in ("kloop", "short", "resident", "pdl2", "fp8", "f32")] or ["layers", "tiles"]
    if "f32" in sys.argv:
        from localsgl_kernels import gemv_tiles

        gemv_tiles.E4M3_FP16 = False
    W = weights()
    for w in what:
        {"tiles": probe_tiles, "layers": probe_layers}[w](W)
