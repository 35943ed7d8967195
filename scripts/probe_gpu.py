"""Device probes (not a benchmark): where a decode step's GPU time goes.

  probe_gpu.py kernels   per-kernel GPU time of bs1 and bs64 decode steps (torch.profiler,
                         Llama-3.1-8B dummy bf16, CUDA graphs on: kernels inside replays)
  probe_gpu.py mixed     per-kernel GPU time of a few mixed steps: 400 requests decoding
                         (~800 context) while 10 new 1,000-token prompts are prefilled
  probe_gpu.py replay    the bs1 decode graph replayed alone, and with the greedy argmax, against
                         the engine's step (the difference: the per-step copies and ops outside the graph)
  probe_gpu.py parts     the bs1 decode step's graph taken apart: the full one-token forward, then
                         without attention, without embedding + final norm, without the LM head,
                         attention alone; and a per-kernel table of the full graph with PDL off
  probe_gpu.py attn1     batch-1 decode attention of 32 layers in one CUDA graph (distinct
                         caches), by context length, split count, min chunk and PDL on/off
  probe_gpu.py shared    split-KV decode kernel, 64 rows x 4,224 tokens: one shared prefix
                         vs distinct slots (does the L2 catch the shared prefix?)
"""
from __future__ import annotations

import sys
import time

import torch


def probe_kernels(batches=(1, 64), steps=16):
    from torch.profiler import ProfilerActivity, profile

    from localsgl import Engine, SamplingParams

    eng = Engine(model="llama-3.1-8b", load_format="dummy", dtype="bfloat16", device="cuda")
    try:
        for bs in batches:
            prompts = [[1000 + i + j for j in range(256)] for i in range(bs)]
            p = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True)
            eng.generate(prompts, p)
            eng.core.cache.reset()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                t = time.perf_counter()
                eng.generate(prompts, p)
                torch.cuda.synchronize()
                wall = time.perf_counter() - t
            print(f"== bs{bs}: {steps} tokens in {wall*1e3:.1f} ms (incl. prefill)")
            _kernel_table(prof, 22)
    finally:
        eng.shutdown()


def _kernel_table(prof, top=24):
    rows = []
    for e in prof.key_averages():
        dt = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if dt > 0:
            rows.append((dt, e.count, e.key))
    rows.sort(reverse=True)
    tot = sum(r[0] for r in rows)
    print(f"   total kernel time {tot/1e3:.2f} ms over {sum(r[1] for r in rows)} launches")
    for dt, n, k in rows[:top]:
        print(f"   {dt/1e3:9.3f} ms {n:6d}x {dt/max(n,1):8.1f} us  {k[:90]}")


def probe_mixed():
    import threading

    from torch.profiler import ProfilerActivity, profile

    from localsgl import Engine, SamplingParams
    from localsgl.engine.debug_switches import DebugSwitches

    eng = Engine(model="llama-3.1-8b", load_format="dummy", dtype="bfloat16", device="cuda",
                 debug_switches=DebugSwitches(profile_steps=True))
    try:
        bg = [[2000 + (i * 7 + j) % 100000 for j in range(800)] for i in range(400)]
        t = threading.Thread(target=eng.generate, args=(bg, SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)))
        t.start()
        while eng.stats()["running"] < 400 or eng.stats()["waiting"] > 0:
            time.sleep(0.05)
        time.sleep(1.0)
        from localsgl.engine.step_profile import StepProfile

        eng.core.profile = StepProfile(eng.device)
        new = [[5000 + (i * 13 + j) % 100000 for j in range(1000)] for i in range(10)]
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            eng.generate(new, SamplingParams(temperature=0, max_tokens=1))
            torch.cuda.synchronize()
        print("== mixed window:", eng.core.profile.summary())
        _kernel_table(prof, 30)
        t.join()
    finally:
        eng.shutdown()


def probe_shared(B=64, L=4224, Hq=32, Hkv=8, D=128, reps=50):
    from localsgl_kernels.decode_attention import (PrefixGroups, alloc_workspace, choose_num_splits,
                                                   decode_attention, prefix_group_rows)

    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    slots = B * L + 1
    k = torch.randn(slots, Hkv, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(B, Hq, D, device=dev, dtype=torch.bfloat16)
    seq = torch.full((B,), L, dtype=torch.int32, device=dev)
    idx = torch.arange(B, device=dev)
    distinct = (torch.arange(B * L, device=dev, dtype=torch.int32).view(B, L) + 1)
    shared = distinct.clone()
    shared[:, :4096] = shared[0, :4096]
    R = prefix_group_rows(Hq // Hkv)
    pg = PrefixGroups.build(B, [(4096, list(range(i, min(i + R, B)))) for i in range(0, B, R)][:4], 4, R, dev)
    ref = None
    for S in (choose_num_splits(B, Hkv, sms), 16):
        ws = alloc_workspace(B, Hq, D, S, dev)
        for name, table, groups in (("distinct", distinct, None), ("shared 4096", shared, None),
                                    ("cascade 4096", shared, pg)):
            for _ in range(3):
                o = decode_attention(q, k, v, table, idx, seq, D ** -0.5, num_splits=S, workspace=ws, groups=groups)
            if table is shared:
                if ref is None:
                    ref = o.float().clone()
                else:
                    print(f"   max |diff| vs plain: {(o.float() - ref).abs().max().item():.2e}")
            torch.cuda.synchronize()
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            for _ in range(reps):
                decode_attention(q, k, v, table, idx, seq, D ** -0.5, num_splits=S, workspace=ws, groups=groups)
            e1.record()
            torch.cuda.synchronize()
            us = e0.elapsed_time(e1) * 1e3 / reps
            gb = B * L * Hkv * D * 2 * 2 / 1e9
            print(f"decode B={B} L={L} S={S:2d} {name:12s}: {us:8.1f} us/layer  ({gb/us*1e6/1e3:.2f} TB/s logical)")


def probe_attn1(L_layers=32, Hq=32, Hkv=8, D=128, reps=50):
    from localsgl_kernels import pdl
    from localsgl_kernels.decode_attention import alloc_workspace, decode_attention
    from probe_gemv import timed_graph  # scripts/ is on sys.path when this file runs

    dev = torch.device("cuda")
    ctx = 4096
    ks = [torch.randn(ctx + 1, Hkv, D, device=dev, dtype=torch.bfloat16) for _ in range(L_layers)]
    vs = [torch.randn_like(k) for k in ks]
    q = torch.randn(1, Hq, D, device=dev, dtype=torch.bfloat16)
    table = (torch.arange(ctx, device=dev, dtype=torch.int32) + 1).view(1, ctx)
    idx = torch.zeros(1, dtype=torch.int64, device=dev)
    for L in (256, 512, 2048):
        seq = torch.full((1,), L, dtype=torch.int32, device=dev)
        for S, mc, use_pdl in ((32, 128, True), (32, 128, False), (32, 64, True), (8, 64, True), (16, 64, True),
                               (4, 64, True)):
            pdl.set_enabled(use_pdl)
            ws = alloc_workspace(1, Hq, D, S, dev)
            out = torch.empty(1, Hq, D, device=dev, dtype=torch.bfloat16)

            def run():
                for i in range(L_layers):
                    decode_attention(q, ks[i], vs[i], table, idx, seq, D ** -0.5, out=out, num_splits=S,
                                     workspace=ws, min_chunk=mc)
            us = timed_graph(run, reps) / L_layers
            print(f"attn bs1 L={L:5d} S={S:2d} min_chunk={mc:3d} pdl={int(use_pdl)}: {us:6.2f} us/layer", flush=True)
    pdl.set_enabled(True)


def probe_replay(reps=200):
    from localsgl import Engine, SamplingParams
    from localsgl_kernels.sampling import argmax_rows
    from probe_gemv import time_calls  # scripts/ is on sys.path when this file runs

    eng = Engine(model="llama-3.1-8b", load_format="dummy", dtype="bfloat16", device="cuda")
    try:
        prompt = [1000 + j for j in range(256)]
        p = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
        eng.generate([prompt], p)  # leaves the bs1 graph's static inputs at a real step (~383 tokens)
        runner = eng.core.runner.graphs
        graph, logits = runner.graphs[(1, False)], runner.outputs[(1, False)]

        t_replay = time_calls(graph.replay, reps)
        t_both = time_calls(lambda: (graph.replay(), argmax_rows(logits)), reps)
        t_argmax = time_calls(lambda: argmax_rows(logits), reps)
        t_torch = time_calls(lambda: logits.argmax(-1), reps)
        eng.core.cache.reset()
        t0 = time.perf_counter()
        eng.generate([prompt], SamplingParams(temperature=0, max_tokens=257, ignore_eos=True))
        t1 = time.perf_counter()
        eng.core.cache.reset()
        eng.generate([prompt], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
        t2 = time.perf_counter()
        step = ((t1 - t0) - (t2 - t1)) / 256 * 1e6
        print(f"bs1 graph replay alone        {t_replay:8.1f} us")
        print(f"bs1 graph replay + argmax     {t_both:8.1f} us")
        print(f"argmax_rows alone             {t_argmax:8.1f} us   (torch argmax {t_torch:.1f} us)")
        print(f"engine decode step (256 out)  {step:8.1f} us   -> outside the graph and argmax: {step - t_both:.1f} us")
    finally:
        eng.shutdown()


def probe_parts(reps=200):
    from localsgl import Engine, SamplingParams
    from localsgl.engine.layers import fused_decode
    from localsgl_kernels import gemv as G, gemv_tiles as T, pdl
    from probe_gemv import capture_graph, time_calls, timed_graph  # scripts/ is on sys.path when this file runs
    from torch.profiler import ProfilerActivity, profile

    eng = Engine(model="llama-3.1-8b", load_format="dummy", dtype="bfloat16", device="cuda")
    try:
        eng.generate([[1000 + j for j in range(256)]], SamplingParams(temperature=0, max_tokens=128, ignore_eos=True))
        runner = eng.core.runner
        model, batch = runner.model, runner.graphs.batches[(1, False)]
        graph = runner.graphs.graphs[(1, False)]
        x0 = model.embed_tokens(batch.input_ids)

        def step(attn=True, ends=True, head=True, layers=True):
            backend, pool = batch.attn_backend, batch.kv_pool
            x = model.embed_tokens(batch.input_ids) if ends else x0
            residual = None
            for layer in (model.layers if layers else []):
                a, mlp = layer.self_attn, layer.mlp
                ln1, ln2 = layer.input_layernorm, layer.post_attention_layernorm
                q, residual = G.norm_qkv(x, residual, ln1.weight, ln1.eps, a.qkv_proj.weight, a.qkv_proj.bias,
                                         model.rotary.cos_sin, batch.positions, batch.out_cache_loc,
                                         pool.k_buffer[a.layer_id], pool.v_buffer[a.layer_id], a.num_heads,
                                         a.num_kv_heads)
                o = backend.attend(q, a.layer_id, batch, a.scale) if attn else q[:, :a.num_heads]
                h = G.gemv(o.reshape(1, a.q_size), a.o_proj.weight)
                y, residual = G.norm_gate_up(h, residual, ln2.weight, ln2.eps, mlp.gate_up_proj.weight)
                x = G.gemv(y, mlp.down_proj.weight)
            if ends and residual is not None:
                x, _ = model.norm(x, residual)
            if head:
                return fused_decode.logits_one_row(model, x, model.lm_head.weight)
            return x

        def attn_only():
            q = torch.randn(1, 32, 128, device="cuda", dtype=torch.bfloat16)
            return lambda: [batch.attn_backend.attend(q, i, batch, 0.088) for i in range(32)]

        rows = [("engine graph replay", lambda: None, graph.replay),
                ("one-token forward + LM head", lambda: step(), None),
                ("  without attention", lambda: step(attn=False), None),
                ("  without embedding + final norm", lambda: step(ends=False), None),
                ("  without LM head", lambda: step(head=False), None),
                ("  LM head alone", lambda: step(attn=False, ends=False, layers=False), None),
                ("attention alone (32 layers)", attn_only(), None)]
        for name, fn, replay in rows:
            us = time_calls(replay, reps) if replay else timed_graph(fn, reps)
            print(f"{name:40s} {us:8.1f} us", flush=True)
        tile = T._CUDA_FULLK["gemv"]
        T._CUDA_FULLK["gemv"] = tile[:3] + (1,)  # o_proj loading one row block before its wait
        print(f"{'one-token forward, o_proj 1 block ahead':40s} {timed_graph(lambda: step(), reps):8.1f} us")
        T._CUDA_FULLK["gemv"] = tile
        from localsgl_kernels import decode_attention as DA

        DA.STAGE2_RELEASES_EARLY = False  # o_proj launched only once the merge has waited
        print(f"{'one-token forward, merge releases late':40s} {timed_graph(lambda: step(), reps):8.1f} us")
        T._CUDA_FULLK["gemv"] = tile[:3] + (1,)
        print(f"{'  and o_proj 1 block ahead':40s} {timed_graph(lambda: step(), reps):8.1f} us")
        T._CUDA_FULLK["gemv"] = tile
        DA.STAGE2_RELEASES_EARLY = True
        pdl.set_enabled(False)
        g = capture_graph(step)
        print(f"{'one-token forward, PDL off':40s} {time_calls(g.replay, reps):8.1f} us")
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                g.replay()
            torch.cuda.synchronize()
        print("per-kernel, PDL off, 10 replays:")
        _kernel_table(prof, 16)
        pdl.set_enabled(True)
    finally:
        eng.shutdown()


if __name__ == "__main__":
    what = sys.argv[1:] or ["shared", "kernels"]
    for w in what:
        {"kernels": probe_kernels, "shared": probe_shared, "mixed": probe_mixed, "attn1": probe_attn1,
         "replay": probe_replay, "parts": probe_parts}[w]()
