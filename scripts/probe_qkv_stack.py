"""One Llama-3.1-8B qkv layer's fused one-token kernel (quant_gemv.norm_qkv) with the weight a
GGUF Q4_K_M layer whose v is Q6_K gives: q/k/v joined in int8 g16 (what joining costs), all
int4 g32 (the file's other layers), and the row stack (q/k int4 g32 + v int8 g16) in one launch
over one preparation (the default), its v over the raw activations, and one launch per block.

    python3 scripts/probe_qkv_stack.py [--copies 8]

CUDA only: µs per call from CUDA-graph replays over ``copies`` weight copies (more bytes than
L2 holds), batch 1, bf16 activations, with the residual."""
from __future__ import annotations

import argparse

import torch

from localsgl.engine.layers.quant import QuantizedWeight, RowStack, WeightFormat
from localsgl.engine.layers.rotary import RotaryEmbedding
from localsgl_kernels import quant_gemv as QG

HQ, HKV, D, H = 32, 8, 128, 4096


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--copies", type=int, default=8)
    a = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    i4, i8 = WeightFormat("int4", 32, False), WeightFormat("int8", 16, True)

    def qw(n, fmt):
        return QuantizedWeight.quantize(torch.randn(n, H, device=dev) * H**-0.5, fmt)

    weights = {
        "joined int8 g16": [qw((HQ + 2 * HKV) * D, i8) for _ in range(a.copies)],
        "joined int4 g32 asym": [qw((HQ + 2 * HKV) * D, i4) for _ in range(a.copies)],
        "stack": [RowStack([qw((HQ + HKV) * D, i4), qw(HKV * D, i8)]) for _ in range(a.copies)],
    }
    x = torch.randn(1, H, device=dev, dtype=torch.bfloat16)
    res = torch.randn_like(x)
    nw = torch.ones(H, device=dev, dtype=torch.bfloat16)
    rope = RotaryEmbedding(D, 64, 10000.0, None, device=dev)
    pos, loc = torch.tensor([21], device=dev), torch.tensor([1], device=dev)
    kc = torch.zeros(3, HKV, D, device=dev, dtype=torch.bfloat16)
    vc = torch.zeros_like(kc)

    def us_per_call(ws) -> float:
        def calls():
            for w in ws:
                QG.norm_qkv(x, res, nw, 1e-5, w, None, rope.cos_sin, pos, loc, kc, vc, HQ, HKV)

        calls()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            calls()
        best = float("inf")
        for _ in range(5):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(40):
                g.replay()
            e.record()
            torch.cuda.synchronize()
            best = min(best, s.elapsed_time(e) * 1e3 / (40 * len(ws)))
        return best

    pair = QG._pair_configs

    def raw_v(*args):  # the second block's words over the raw activations (no shared preparation)
        p = pair(*args)
        return p and (p[0], p[1]._replace(words=min(p[1].words, 1)))

    rows = [(name, ws, None) for name, ws in weights.items()]
    rows.append(("stack, v over raw activations", weights["stack"], raw_v))
    rows.append(("stack, one launch per block", weights["stack"], lambda *args: None))
    print(f"{'qkv weight':32s} {'µs':>7s} {'MB':>6s}  tiles")
    for name, ws, patch in rows:
        QG._pair_configs = patch or pair
        try:
            w = ws[0]
            tiles = (QG._pair_configs(w.parts, D, H, "cuda") if isinstance(w, RowStack)
                     else QG.default_config(w, D // 2, "cuda"))
            print(f"{name:32s} {us_per_call(ws):7.2f} {w.nbytes / 1e6:6.1f}  {tiles}", flush=True)
        finally:
            QG._pair_configs = pair


if __name__ == "__main__":
    main()
