"""The SASS instruction mix of Triton kernels compiled for sm_90 here, without a GPU: registers and
the most frequent opcodes of each named spec of tests/kernels/test_quant_compile_sm90.py, e.g. to
compare two variants of a kernel before timing them on a device.

    python scripts/sass_mix.py [--top 12] ["fp8 row full-K gate_up" "fp8 row full-K gate_up fp16 products" ...]

Without names it lists the specs.  The counts are static (each instruction once, loops not
unrolled further), so they compare variants of one kernel, not kernels of different shapes."""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "tests", "kernels"), ROOT]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*")
    p.add_argument("--top", type=int, default=12)
    a = p.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)
    from sm90_compile import can_compile, compile_all
    from test_quant_compile_sm90 import _specs

    specs = _specs()
    if not a.names:
        print("\n".join(specs))
        return 0
    unknown = [n for n in a.names if n not in specs]
    if unknown:
        print(f"unknown spec(s): {unknown}; run without names for the list", file=sys.stderr)
        return 2
    if not can_compile():
        print("needs Triton's bundled ptxas and cuobjdump", file=sys.stderr)
        return 1
    results = compile_all([dict(specs[n], sass_mix=True) for n in a.names], timeout=900)
    for name, r in zip(a.names, results):
        if not r["ok"]:
            print(f"{name}: {r['error']}")
            continue
        mix = r["sass_mix"]
        top = sorted(mix.items(), key=lambda kv: -kv[1])[: a.top]
        print(f"{name}: {r['resources']}, {sum(mix.values())} instructions; " + ", ".join(f"{op} {n}" for op, n in top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
