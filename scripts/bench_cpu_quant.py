"""CPU decode of the embedded SmolLM2-135M from its quantized weights against dense.

    python scripts/bench_cpu_quant.py [--configs "dequantize float32" "keep bfloat16" ...] [--rounds 2]
                                      [--batch 1] [--prompt-len 32]

Each configuration (``--weights`` mode and dtype) runs in its own process (torch's CPU thread
pool is fastest in the thread that first used it), in turn, ``--rounds`` times; decode rate =
batch·64 / (time of 65 new tokens − time of 1) for ``--batch`` concurrent prompts, median of 3
per process; "first" is the time of the 1-token run (the prompts' prefill and first token).
Set OMP_NUM_THREADS to fix the thread count on a shared machine."""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

CHILD = """
import statistics, sys, time
from localsgl import Engine, SamplingParams
mode, dtype, batch, plen = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
with Engine(model="smollm2-135m", device="cpu", dtype=dtype, weights=mode) as e:
    ids = [[1000 + (7 * i + j) % 30000 for j in range(plen)] for i in range(batch)]
    p = lambda n: SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    e.generate(ids, p(8))
    rates, firsts = [], []
    for _ in range(3):
        e.core.cache.reset()
        t = time.perf_counter(); e.generate(ids, p(1)); t1 = time.perf_counter() - t
        e.core.cache.reset()
        t = time.perf_counter(); e.generate(ids, p(65)); tn = time.perf_counter() - t
        rates.append(batch * 64 / (tn - t1))
        firsts.append(t1)
    print(statistics.median(rates), statistics.median(firsts))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="*", default=["dequantize float32", "keep bfloat16", "dequantize bfloat16",
                                                     "keep float32"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=32)
    a = ap.parse_args()
    rates: dict[str, list[float]] = {c: [] for c in a.configs}
    firsts: dict[str, list[float]] = {c: [] for c in a.configs}
    for _ in range(a.rounds):
        for c in a.configs:
            out = subprocess.run([sys.executable, "-c", CHILD, *c.split(), str(a.batch), str(a.prompt_len)],
                                 capture_output=True, text=True)
            if out.returncode:
                print(f"FAILED {c}: {out.stderr[-500:]}", file=sys.stderr)
                continue
            rate, first = map(float, out.stdout.strip().splitlines()[-1].split())
            rates[c].append(rate)
            firsts[c].append(first)
    base = statistics.median(rates[a.configs[0]]) if rates[a.configs[0]] else None
    print(f"batch {a.batch}, {a.prompt_len}-token prompts")
    print(f"{'weights dtype':<24} {'decode tok/s':>12} {'vs first':>9} {'first s':>8}   "
          f"(load average {open('/proc/loadavg').read().split()[0]})")
    for c, r in rates.items():
        if r:
            m = statistics.median(r)
            print(f"{c:<24} {m:12.1f} {m / base if base else float('nan'):9.2f} {statistics.median(firsts[c]):8.3f}   "
                  f"{[round(x, 1) for x in r]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
