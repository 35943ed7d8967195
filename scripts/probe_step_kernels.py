"""Where one step's device time goes, kernel by kernel: torch.profiler over decode steps (batch 1, or
``--batch`` rows of distinct prompts) or one prefill of the random Llama-3.1-8B shape, in a given
weight format.

    python3 scripts/probe_step_kernels.py [--quantization fp8|int4|...] [--gguf FILE] [--prefill 2048]
                                          [--steps 32] [--prompt-len 256] [--batch 64] [--kv-cache-dtype fp8]
                                          [--top 25]

CUDA graphs are off so that each kernel is its own profiler event (the kernels are those the graphs
replay); run with LOCALSGL_DEBUG_NO_PDL=1 for kernel times without the overlap of PDL's early launch.
Prints probe_gpu.py's kernel table (total and per-launch device time) beside the request's wall time
without the profiler.  probe_gpu.py kernels does the same for bf16 with graphs on, at batch 1 and 64."""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from probe_gpu import _kernel_table  # noqa: E402

from localsgl.engine.api import Engine  # noqa: E402
from localsgl.engine.params import SamplingParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--gguf", default=None)
    ap.add_argument("--prefill", type=int, default=0, help="profile one prefill of this many tokens instead")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=256, help="decode after a prompt of this many tokens")
    ap.add_argument("--batch", type=int, default=1, help="decode this many rows at once (distinct prompts)")
    ap.add_argument("--kv-cache-dtype", default=None)
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    # in this process: the profiler sees the kernels of this process's CUDA context only
    kw = dict(device="cuda", dtype="bfloat16", max_running=a.batch, disable_cuda_graph=True, in_process=True,
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
        fixed = [torch.randint(100, 20000, (n_prompt,), generator=g).tolist() for _ in range(a.batch)]

        def prompt():  # prefill: a fresh prompt each time (a cached prefix would skip it); decode: the
            # same ones, so that the profiled requests' prefill is one token off the prefix cache
            if a.prefill:
                return torch.randint(100, 20000, (n_prompt,), generator=g).tolist()
            return fixed[0] if a.batch == 1 else fixed
        out_tokens = 2 if a.prefill else a.steps
        params = SamplingParams(max_tokens=out_tokens, temperature=0.0, ignore_eos=True)
        for _ in range(2):  # warm: compile, caches
            eng.generate(prompt(), params)
        t0 = time.perf_counter()
        eng.generate(prompt(), params)
        wall = time.perf_counter() - t0
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            eng.generate(prompt(), params)
            torch.cuda.synchronize()
        what = (f"one prefill of {a.prefill}" if a.prefill
                else f"{out_tokens} decode steps of {a.batch} row(s) after {n_prompt} tokens")
        print(f"{a.gguf or a.quantization or 'bf16'} (KV {a.kv_cache_dtype or 'model dtype'}): {what}; "
              f"the request took {wall * 1e3:.1f} ms without the profiler")
        _kernel_table(prof, a.top)
    finally:
        eng.shutdown()


if __name__ == "__main__":
    main()
