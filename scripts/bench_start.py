#!/usr/bin/env python
"""Time `localsgl run` from the command's start to its first answer byte on stdout.

What shell scripts that pipe one prompt at a time wait for: process start, imports, the
model load (from the conversion cache once warm), the prompt's prefill and first token.
Each run is a fresh process; the median of --runs is reported after one untimed warm-up
run (which fills the conversion cache and the page cache).

    python scripts/bench_start.py                       # echo "What is 2+2?" | localsgl run --max-tokens 1 --local
    python scripts/bench_start.py --runs 5 -- -m smollm2-135m --dtype float32
    python scripts/bench_start.py --json

Arguments after ``--`` are appended to the `localsgl run` command line.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time


def time_once(cmd: list[str], prompt: str, env: dict, cwd: str | None = None) -> dict:
    """Seconds to the first stdout byte and to the exit of one run of ``cmd``."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd)
    proc.stdin.write(prompt.encode())
    proc.stdin.close()
    first = proc.stdout.read(1)
    t_first = time.perf_counter() - t0
    rest = proc.stdout.read()
    err = proc.stderr.read()
    rc = proc.wait()
    t_exit = time.perf_counter() - t0
    if rc != 0 or not first:
        raise SystemExit(f"`{' '.join(cmd)}` failed (exit {rc}):\n{err.decode(errors='replace')[-2000:]}")
    return {"first_byte_s": t_first, "exit_s": t_exit, "answer": (first + rest).decode(errors="replace").strip()}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--prompt", default="What is 2+2?")
    ap.add_argument("--max-tokens", type=int, default=1)
    ap.add_argument("--remote", action="store_true", help="allow `run` to use a running `localsgl serve` (no --local)")
    ap.add_argument("--pythonpath", help="run `python -m localsgl.cli` from this source tree instead (e.g. a "
                                         "git worktree of an older commit, for before/after)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    exe = None if args.pythonpath else (shutil.which("localsgl", path=os.path.dirname(sys.executable)) or shutil.which("localsgl"))
    cmd = [exe] if exe else [sys.executable, "-m", "localsgl.cli"]
    if args.pythonpath:
        env["PYTHONPATH"] = os.path.abspath(args.pythonpath) + os.pathsep + env.get("PYTHONPATH", "")
    cmd += ["run", "--max-tokens", str(args.max_tokens)] + ([] if args.remote else ["--local"]) + extra

    # `python -m` puts the working directory first on sys.path: run from the tree being timed
    cwd = os.path.abspath(args.pythonpath) if args.pythonpath else None
    time_once(cmd, args.prompt + "\n", env, cwd)  # warm-up: conversion cache, page cache
    runs = [time_once(cmd, args.prompt + "\n", env, cwd) for _ in range(args.runs)]
    firsts = [r["first_byte_s"] for r in runs]
    exits = [r["exit_s"] for r in runs]
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    report = {
        "command": f"echo {args.prompt!r} | " + " ".join(["localsgl"] + cmd[1:] if exe else cmd)
        + (f"  (PYTHONPATH={args.pythonpath})" if args.pythonpath else ""),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_avg_1m": load,
        "runs": args.runs,
        "first_byte_s": {"median": statistics.median(firsts), "min": min(firsts), "max": max(firsts)},
        "exit_s": {"median": statistics.median(exits), "min": min(exits), "max": max(exits)},
        "answer": runs[-1]["answer"],
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        f, e = report["first_byte_s"], report["exit_s"]
        print(report["command"])
        print(f"first byte  median {f['median']:.2f} s  (min {f['min']:.2f}, max {f['max']:.2f}) over {args.runs} runs")
        print(f"exit        median {e['median']:.2f} s  (min {e['min']:.2f}, max {e['max']:.2f})")
        if load is not None:
            print(f"load average (1 min) at the end: {load:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
