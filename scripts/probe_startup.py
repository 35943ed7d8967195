"""Device probe (not a benchmark): where a cold start's "ready after weights" time goes.

  python3 scripts/probe_startup.py        fresh Triton cache; Llama-3.1-8B dummy bf16 engine; prints the
                                          time spent compiling each Triton kernel (count of variants,
                                          seconds; summed over compile threads) against the whole
                                          ready-after-weights time
  (LOCALSGL_DEBUG_NO_COMPILE_AHEAD=1: the same, compiling serially at first launch)
The engine should be ready (graphs captured) within 20 s of the weights reaching the GPU.
"""
from __future__ import annotations

import collections
import os
import sys
import tempfile
import threading
import time


def main() -> None:
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-cold-")
    import triton.compiler

    spent = collections.defaultdict(lambda: [0, 0.0])
    lock = threading.Lock()
    real_compile = triton.compiler.compile

    def timed_compile(src, *args, **kwargs):
        t = time.perf_counter()
        try:
            return real_compile(src, *args, **kwargs)
        finally:
            name = getattr(getattr(src, "fn", None), "__name__", str(src))
            with lock:
                spent[name][0] += 1
                spent[name][1] += time.perf_counter() - t

    triton.compiler.compile = timed_compile  # JITFunction binds `compile` from this module on first use

    from localsgl import Engine

    t = time.perf_counter()
    eng = Engine(model="llama-3.1-8b", load_format="dummy", dtype="bfloat16", device="cuda")
    total = time.perf_counter() - t
    try:
        runner = eng.core.runner
        ahead = getattr(runner.graphs, "compile_ahead_seconds", None)
        eng.wait_graphs()  # the buckets past the start-up ones are captured while the engine idles
        print(f"engine {total:.1f} s, ready after weights {eng.ready_after_weights_seconds:.1f} s, "
              f"start-up graph capture {getattr(runner, 'graph_capture_seconds', float('nan')):.1f} s "
              f"(of which compiling ahead, in parallel: {'off' if ahead is None else f'{ahead:.1f} s'}), "
              f"every graph captured {eng.graphs_ready_after_weights_seconds:.1f} s after the weights")
        print(f"{'kernel':40s} {'variants':>8s} {'seconds':>8s}")
        for name, (n, s) in sorted(spent.items(), key=lambda kv: -kv[1][1]):
            print(f"{name:40s} {n:8d} {s:8.2f}")
        print(f"{'all':40s} {sum(n for n, _ in spent.values()):8d} {sum(s for _, s in spent.values()):8.2f}")
    finally:
        eng.shutdown()


if __name__ == "__main__":
    sys.exit(main())
