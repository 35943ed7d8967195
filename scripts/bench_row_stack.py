"""A GGUF kept quantized with each fused q/k/v joined in one format vs in its parts' own formats
(quant.row_runs' RowStack; e.g. a Q4_K_M file whose Q6_K v would widen q/k to int8): batch-1
decode ms/token and the streamed weight bytes, in one process, modes in the order given.

    python3 scripts/bench_row_stack.py FILE.gguf [--modes stack joined stack] [--runs 3] [--device cuda]

(FILE: e.g. scripts/random_q4km_gguf.py's, or /tmp/peer/q4km.gguf from shared/peer.)  One JSON
line per mode."""
from __future__ import annotations

import argparse
import json
import time
from types import SimpleNamespace

from localsgl import bench
from localsgl.engine.api import Engine
from localsgl.engine.layers import quant
from localsgl.engine.layers.quant import streamed_weight_bytes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("--modes", nargs="+", default=["stack", "joined", "stack"], choices=["stack", "joined"])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    default = quant._JOIN_OVERHEAD
    for mode in a.modes:
        quant._JOIN_OVERHEAD = float("inf") if mode == "joined" else default  # joined: any widening accepted
        t0 = time.time()
        e = Engine(model=a.gguf, device=a.device, dtype="bfloat16", weights="keep", max_running=8, in_process=True)
        try:
            e.wait_graphs()
            ceil = bench.measure_ceilings(e.device)
            args = SimpleNamespace(seed=0, runs=a.runs, input_len=256, output_len=256, batch=[1],
                                   repetition_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0)
            r = bench.bench_latency(e, ceil, args)[0]
            print(json.dumps({"mode": mode, "bs1_ms": r["measured"], "tok_s": 1e3 / r["measured"],
                              "floor_ms": r["floor"], "x_floor": r["ratio"],
                              "weights_gb": streamed_weight_bytes(e.model) / 1e9, "seconds": time.time() - t0}),
                  flush=True)
        finally:
            e.shutdown()
    quant._JOIN_OVERHEAD = default


if __name__ == "__main__":
    main()
