"""Where an engine's GPU memory goes, against its plan (issue 14 part 6: a small card's cap).

  python3 scripts/probe_memory.py [--quantization int4] [--gpu-memory 8GiB] [--kv-cache-dtype fp8]
      [--num-prompts 300] [--model llama-3.1-8b]

Starts an engine (random weights), prints the plan's items, then what torch's allocator holds
once it is ready (weights, KV pool, graph pools, buffers: the persistent part) and the device's
memory in use; runs bench's mixed throughput workload and prints the allocator's peaks (allocated
and reserved) against the plan's budget.  The workload's allocations are recorded
(torch.cuda.memory._record_memory_history) and replayed: at the moment the memory allocated
during it peaked, the live blocks grouped by the first localsgl frame that allocated them, so an
uncounted transient names its line.
"""
from __future__ import annotations

import argparse
import collections
import os
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from localsgl import bench  # noqa: E402
from localsgl.engine.api import Engine  # noqa: E402

MiB = 1 << 20


def _where(frames) -> str:
    """The innermost localsgl / kernels frame of an allocation's stack."""
    for f in frames or ():
        name = f.get("filename", "")
        if "localsgl" in name or "/kernels/" in name:
            return f"{name.rsplit('/', 2)[-2]}/{name.rsplit('/', 1)[-1]}:{f.get('line')} {f.get('name')}"
    return "(outside localsgl)"


def live_by_site(trace) -> collections.Counter:
    """Replay one device's trace from the recording's start: the bytes still live at its end, by
    where they were allocated."""
    live: dict[int, tuple[int, str]] = {}
    for e in trace:
        if e["action"] == "alloc":
            live[e["addr"]] = (e["size"], _where(e.get("frames")))
        elif e["action"] == "free_completed":
            live.pop(e["addr"], None)
    by_site = collections.Counter()
    for size, site in live.values():
        by_site[site] += size
    return by_site


def transient_peak(trace) -> tuple[int, collections.Counter]:
    """Replay one device's trace from the recording's start: the most bytes allocated in it and
    live at once, and those bytes by where they were allocated."""
    live: dict[int, tuple[int, str]] = {}
    total = peak = 0
    at_peak: dict[int, tuple[int, str]] = {}
    for e in trace:
        if e["action"] == "alloc":
            live[e["addr"]] = (e["size"], _where(e.get("frames")))
            total += e["size"]
            if total > peak:
                peak, at_peak = total, dict(live)
        elif e["action"] == "free_completed" and e["addr"] in live:
            total -= live.pop(e["addr"])[0]
    by_site = collections.Counter()
    for size, site in at_peak.values():
        by_site[site] += size
    return peak, by_site


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--quantization", default="int4")
    ap.add_argument("--gpu-memory", default="8GiB")
    ap.add_argument("--kv-cache-dtype", default=None)
    ap.add_argument("--num-prompts", type=int, default=300)
    a = ap.parse_args()
    kw = dict(model=a.model, load_format="dummy", dtype="bfloat16", device="cuda", quantization=a.quantization,
              gpu_memory=a.gpu_memory, kv_cache_dtype=a.kv_cache_dtype, in_process=True)
    torch.cuda.init()
    free0, total = torch.cuda.mem_get_info()
    print(f"device {torch.cuda.get_device_name()}: {total / MiB:,.0f} MiB, {(total - free0) / MiB:,.0f} MiB in use "
          f"before the engine (CUDA context)")
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    engine = Engine(**kw)
    try:
        engine.wait_graphs()
        ready = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        held = live_by_site((ready.get("device_traces") or [[]])[torch.cuda.current_device()])
        print(f"held once ready, by allocating line ({sum(held.values()) / MiB:,.0f} MiB):")
        for site, size in held.most_common(14):
            print(f"  {size / MiB:9,.1f} MiB  {site}")
        p = engine.plan.to_dict()
        items = {k: p[k] for k in ("weights_bytes", "kv_bytes", "activation_reserve_bytes", "graph_reserve_bytes",
                                   "req_to_token_bytes", "safety_margin_bytes")}
        print(f"plan: budget {p['budget_bytes'] / MiB:,.0f} MiB; " + ", ".join(f"{k} {v / MiB:,.0f}" for k, v in items.items())
              + f"; KV {p['kv_tokens']:,} tokens, max_running {p['max_running']}")
        planned_persistent = sum(items[k] for k in ("weights_bytes", "kv_bytes", "graph_reserve_bytes", "req_to_token_bytes"))
        alloc0, res0 = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
        free1, _ = torch.cuda.mem_get_info()
        print(f"ready: allocated {alloc0 / MiB:,.0f} MiB (plan's weights + KV + graphs + table "
              f"{planned_persistent / MiB:,.0f}), reserved {res0 / MiB:,.0f}, device in use {(total - free1) / MiB:,.0f}; "
              f"start-up peak reserved {torch.cuda.max_memory_reserved() / MiB:,.0f}")
        torch.cuda.reset_peak_memory_stats()
        rng = random.Random(0)
        reqs = bench.mixed_lengths(rng, a.num_prompts)
        prompts = bench._random_prompts(rng, engine.config.vocab_size, [i for i, _ in reqs])
        torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
        t, outputs = bench._timed_outputs(engine, prompts, [o for _, o in reqs])
        snap = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        done = sum(len(o.token_ids) == n for o, (_, n) in zip(outputs, reqs))
        free2, _ = torch.cuda.mem_get_info()
        pa, pr = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        print(f"workload: {done}/{len(reqs)} complete in {t:.1f} s; peak allocated {pa / MiB:,.0f} MiB "
              f"(+{(pa - alloc0) / MiB:,.0f} over ready; plan's activation reserve "
              f"{items['activation_reserve_bytes'] / MiB:,.0f}), peak reserved {pr / MiB:,.0f} "
              f"(budget {p['budget_bytes'] / MiB:,.0f}), device in use after {(total - free2) / MiB:,.0f}")
        traces = snap.get("device_traces") or [[]]
        peak, by_site = transient_peak(traces[torch.cuda.current_device()])
        print(f"recorded transient peak {peak / MiB:,.0f} MiB ({len(traces[0]):,} trace entries):")
        for site, size in by_site.most_common(12):
            print(f"  {size / MiB:9,.1f} MiB  {site}")
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()
