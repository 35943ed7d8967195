"""Where a mixed prefill+decode step's time goes: host launch time against device time, eager
against piecewise graphs (engine/piecewise_graph.py), at the offline workload's step shape.

A step of the 1,000-prompt mixed workload holds a prefill chunk (2,048-token budget, ~1,400
tokens on average) and one row per running decode (~400 rows, ~700 tokens of context).  For
each path the probe reports, median over ``--reps`` runs of the forward + LM head:
  * wall: launch to synchronize;
  * host: launch to return (the host's enqueue time; wall ≈ host means the host is the bound);
  * kernels: the sum of the kernels' device times (torch profiler), i.e. the step's device
    time without launch gaps, with the largest kernels by name;
and the floor of the step's GEMMs (2·params·tokens over 790 TFLOP/s) and of its decode
attention (KV bytes read over 4.0 TB/s).

Usage (device machine, PYTHONPATH as in scripts/device_check.sh):
    python3 scripts/probe_mixed.py [--model llama-3.2-1b] [--decode 400] [--context 700]
        [--prefill 1400] [--chunks 2] [--reps 20] [--device cuda]
On the CPU (``--device cpu``) it runs the eager path only (no graphs), as a smoke test.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from localsgl import Engine
from localsgl.engine.batch import ForwardBatch, ForwardMode
from localsgl.engine.debug_switches import DebugSwitches


def mixed_batch(core, decode: int, context: int, prefill: int, chunks: int, seed: int = 0) -> ForwardBatch:
    """``decode`` one-token rows over ~``context`` cached tokens (random K/V), then ``chunks``
    prefill rows sharing ``prefill`` new tokens, each behind a short cached prefix."""
    rng = random.Random(seed)
    pool, rt = core.kv_pool, core.req_pool
    dev = pool.device
    rows = [(max(1, int(context * rng.uniform(0.5, 1.5))), 1) for _ in range(decode)]
    rows += [(rng.randint(0, 512), prefill // chunks + (i < prefill % chunks)) for i in range(chunks)]
    if len(rows) > rt.max_reqs:
        raise SystemExit(f"{len(rows)} rows, the engine has {rt.max_reqs}")
    ids, pos, loc, starts = [], [], [], []
    for i, (pre, ext) in enumerate(rows):
        slots = pool.alloc(pre + ext)
        if slots is None:
            raise SystemExit("KV pool too small for this shape")
        rt.write(i + 1, 0, slots)
        s = slots.to(dev)
        for layer in range(pool.num_layers):  # never time on zeros
            pool.k_buffer[layer][s[:pre]] = torch.randn(pre, pool.num_kv_heads, pool.head_dim, device=dev).to(pool.k_buffer[layer].dtype)
            pool.v_buffer[layer][s[:pre]] = torch.randn(pre, pool.num_kv_heads, pool.head_dim, device=dev).to(pool.v_buffer[layer].dtype)
        starts.append(len(ids))
        ids += [rng.randrange(100, core.vocab_size - 100) for _ in range(ext)]
        pos += list(range(pre, pre + ext))
        loc += slots[pre:].tolist()
    i32 = dict(dtype=torch.int32, device=dev)
    return ForwardBatch(
        mode=ForwardMode.EXTEND, batch_size=len(rows), input_ids=torch.tensor(ids, device=dev),
        positions=torch.tensor(pos, device=dev), out_cache_loc=torch.tensor(loc, device=dev),
        req_pool_indices=torch.arange(1, len(rows) + 1, device=dev),
        seq_lens=torch.tensor([p + e for p, e in rows], **i32), prefix_lens=torch.tensor([p for p, _ in rows], **i32),
        extend_lens=torch.tensor([e for _, e in rows], **i32), extend_start_loc=torch.tensor(starts, **i32),
        seq_lens_cpu=[p + e for p, e in rows], prefix_lens_cpu=[p for p, _ in rows],
        extend_lens_cpu=[e for _, e in rows], req_to_token=rt.table, kv_pool=pool, attn_backend=core.attn,
    )


def step(core, batch: ForwardBatch, piecewise: bool):
    """The runner's forward of an extend batch (eager or piecewise) and the LM head of the rows
    it samples (one per request)."""
    runner = core.runner
    core.attn.init_forward(batch)
    if piecewise:
        hidden = runner.graphs.piecewise.run(batch)
    else:
        hidden = runner.model(batch.input_ids, batch.positions, batch)
    last = batch.extend_start_loc.long() + batch.extend_lens.long() - 1
    return runner.model.compute_logits(hidden[last])


def time_path(core, batch, piecewise: bool, reps: int, cuda: bool) -> dict:
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(3):
        step(core, batch, piecewise)
    sync()
    walls, hosts = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        step(core, batch, piecewise)
        t1 = time.perf_counter()
        sync()
        t2 = time.perf_counter()
        hosts.append(t1 - t0)
        walls.append(t2 - t0)
    out = {"wall_ms": 1e3 * statistics.median(walls), "host_ms": 1e3 * statistics.median(hosts)}
    if cuda:
        from torch.profiler import ProfilerActivity, profile

        n = 3
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(n):
                step(core, batch, piecewise)
            sync()
        per_kernel: dict[str, float] = {}
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                per_kernel[e.name] = per_kernel.get(e.name, 0.0) + e.device_time / 1e3 / n
        out["kernels_ms"] = sum(per_kernel.values())
        out["top"] = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:8]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3.2-1b")
    ap.add_argument("--decode", type=int, default=400)
    ap.add_argument("--context", type=int, default=700)
    ap.add_argument("--prefill", type=int, default=1400)
    ap.add_argument("--chunks", type=int, default=2)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    cuda = a.device == "cuda"
    t = time.perf_counter()
    eng = Engine(model=a.model, load_format="dummy", dtype="bfloat16", device=a.device,
                 debug_switches=DebugSwitches(piecewise_graphs=cuda))
    graphs = eng.core.runner.graphs
    pw = graphs.piecewise if graphs is not None else None
    if pw is not None:
        eng.wait_graphs()  # the engine thread captures every bucket, then idles: the probe owns the GPU
    print(f"engine ready in {time.perf_counter() - t:.1f} s; piecewise buckets {len(pw.graphs) if pw else 0} "
          f"captured in {pw.capture_seconds if pw else 0:.1f} s", flush=True)
    core = eng.core
    with torch.inference_mode():
        batch = mixed_batch(core, a.decode, a.context, a.prefill, a.chunks)
        T = batch.num_tokens
        cfg = core.model.config
        head = cfg.vocab_size * cfg.hidden_size
        body = cfg.num_params - head * (1 if cfg.tie_word_embeddings else 2)
        gemm_floor = 2 * (body * T + head * batch.batch_size) / 790e12 * 1e3
        kv_bytes = core.kv_pool.bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, core.kv_pool.dtype)
        attn_floor = sum(batch.seq_lens_cpu[:a.decode]) * kv_bytes / 4.0e12 * 1e3
        print(f"step: {T} tokens ({a.decode} decode rows, {a.prefill} prefill in {a.chunks}), "
              f"bucket {pw.planned_bucket(T) if pw else '-'}; floors: GEMMs {gemm_floor:.2f} ms, "
              f"decode attention {attn_floor:.2f} ms", flush=True)
        paths = [("eager", False)] + ([("piecewise", True)] if pw is not None and pw.applies(batch) else [])
        results = {name: time_path(core, batch, p, a.reps, cuda) for name, p in paths}
    for name, r in results.items():
        print(f"\n{name}: top kernels (ms per step)")
        for k, v in r.get("top", []):
            print(f"  {v:8.3f}  {k[:110]}")
    print(f"\n{'path':10s} {'wall ms':>9s} {'host ms':>9s} {'kernels ms':>11s}")
    for name, r in results.items():
        print(f"{name:10s} {r['wall_ms']:9.2f} {r['host_ms']:9.2f} {r.get('kernels_ms', float('nan')):11.2f}")
    eng.shutdown()


if __name__ == "__main__":
    main()
