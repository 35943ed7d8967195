"""Where one step's device time goes, kernel by kernel: torch.profiler over batch-1 decode steps or one
prefill of the random Llama-3.1-8B shape, in a given weight format.

    python3 scripts/probe_step_kernels.py [--quantization fp8|int4|...] [--gguf FILE] [--prefill 2048]
                                          [--steps 32] [--prompt-len 256] [--kv-cache-dtype fp8] [--top 25]

CUDA graphs are off so that each kernel is its own profiler event (the kernels are those the graphs
replay).  Prints the kernels sorted by total device time per step (µs), their launches per step, and
the sum, beside the step's wall time without the profiler."""
from __future__ import annotations

import argparse
import collections
import time

import torch

from localsgl.engine.api import Engine
from localsgl.engine.params import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--gguf", default=None)
    ap.add_argument("--prefill", type=int, default=0, help="profile one prefill of this many tokens instead")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=256, help="decode after a prompt of this many tokens")
    ap.add_argument("--kv-cache-dtype", default=None)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    kw = dict(device=a.device, dtype="bfloat16", max_running=1, disable_cuda_graph=True,
              kv_cache_dtype=a.kv_cache_dtype, max_model_len=max(a.prefill, a.prompt_len) + a.steps + 64)
    if a.gguf:
        kw.update(model=a.gguf, weights="keep")
    else:
        kw.update(model=a.model, load_format="dummy")
        if a.quantization:
            kw.update(quantization=a.quantization, weights="keep")
    eng = Engine(**kw)
    try:
        g = torch.Generator().manual_seed(0)
        n_prompt = a.prefill or a.prompt_len
        fixed = torch.randint(100, 20000, (n_prompt,), generator=g).tolist()

        def prompt():  # prefill: a fresh prompt each time (a cached prefix would skip it); decode: the
            # same one, so that the profiled request's prefill is one token off the prefix cache
            return torch.randint(100, 20000, (n_prompt,), generator=g).tolist() if a.prefill else fixed
        out_tokens = 2 if a.prefill else a.steps
        params = SamplingParams(max_tokens=out_tokens, temperature=0.0, ignore_eos=True)
        for _ in range(2):  # warm: compile, caches
            eng.generate(prompt(), params)
        t0 = time.perf_counter()
        eng.generate(prompt(), params)
        wall = time.perf_counter() - t0
        on_gpu = a.device != "cpu"
        acts = [torch.profiler.ProfilerActivity.CUDA if on_gpu else torch.profiler.ProfilerActivity.CPU]
        with torch.profiler.profile(activities=acts) as prof:
            eng.generate(prompt(), params)
            if on_gpu:
                torch.cuda.synchronize()
        per = collections.defaultdict(lambda: [0.0, 0])
        for ev in prof.events():
            if not on_gpu:
                per[ev.name][0] += ev.self_cpu_time_total
                per[ev.name][1] += 1
            elif ev.device_type == torch.autograd.DeviceType.CUDA:
                per[ev.name][0] += ev.device_time_total
                per[ev.name][1] += 1
        div = 1 if a.prefill else out_tokens
        what = f"prefill of {a.prefill}" if a.prefill else f"decode step (of {out_tokens}, prompt {n_prompt})"
        total = sum(v[0] for v in per.values()) / div
        print(f"{a.gguf or a.quantization or 'bf16'} (KV {a.kv_cache_dtype or 'model dtype'}): {what}: device {total:.1f} µs per "
              f"{'prefill' if a.prefill else 'step'}; wall without profiler {wall * 1e3:.1f} ms for the request")
        for name, (us, n) in sorted(per.items(), key=lambda kv: -kv[1][0])[: a.top]:
            print(f"{us / div:10.1f} µs {n / div:7.1f}x  {name[:110]}")
    finally:
        eng.shutdown()


if __name__ == "__main__":
    main()
