"""CPU batch-1 decode of the embedded SmolLM2-135M from its quantized weights against dense.

    python scripts/bench_cpu_quant.py [--configs "dequantize float32" "keep bfloat16" ...] [--rounds 2]

Each configuration (``--weights`` mode and dtype) runs in its own process (torch's CPU thread
pool is fastest in the thread that first used it), in turn, ``--rounds`` times; decode rate =
64 / (time of 65 new tokens − time of 1), median of 3 per process.  Set OMP_NUM_THREADS to fix
the thread count on a shared machine."""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

CHILD = """
import statistics, sys, time
from localsgl import Engine, SamplingParams
mode, dtype = sys.argv[1], sys.argv[2]
with Engine(model="smollm2-135m", device="cpu", dtype=dtype, weights=mode) as e:
    ids = list(range(1000, 1032))
    p = lambda n: SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    e.generate(ids, p(8))
    rates = []
    for _ in range(3):
        t = time.perf_counter(); e.generate(ids, p(1)); t1 = time.perf_counter() - t
        t = time.perf_counter(); e.generate(ids, p(65)); tn = time.perf_counter() - t
        rates.append(64 / (tn - t1))
    print(statistics.median(rates))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="*", default=["dequantize float32", "keep bfloat16", "dequantize bfloat16",
                                                     "keep float32"])
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    rates: dict[str, list[float]] = {c: [] for c in a.configs}
    for _ in range(a.rounds):
        for c in a.configs:
            out = subprocess.run([sys.executable, "-c", CHILD, *c.split()], capture_output=True, text=True)
            if out.returncode:
                print(f"FAILED {c}: {out.stderr[-500:]}", file=sys.stderr)
                continue
            rates[c].append(float(out.stdout.strip().splitlines()[-1]))
    base = statistics.median(rates[a.configs[0]]) if rates[a.configs[0]] else None
    print(f"{'weights dtype':<24} {'decode tok/s':>12} {'vs first':>9}   (load average {open('/proc/loadavg').read().split()[0]})")
    for c, r in rates.items():
        if r:
            m = statistics.median(r)
            print(f"{c:<24} {m:12.1f} {m / base if base else float('nan'):9.2f}   {[round(x, 1) for x in r]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
