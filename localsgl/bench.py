"""`localsgl bench`: latency, throughput and prefix-reuse workloads, each printed with
its floor on this device (bytes over measured copy bandwidth, FLOPs over measured
matmul rate) and the ratio measured/floor.  DESIGN.md §5 defines the workloads.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time

import torch

from .engine.api import Engine
from .engine.params import SamplingParams


# ---------------------------------------------------------------- device ceilings
def measure_ceilings(device: torch.device) -> dict:
    """Copy bandwidth (bytes read + written per second) and bf16/fp32 matmul rate."""
    if device.type == "cuda":
        n = 1 << 28  # 256M bf16 = 512 MiB
        a = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
        b = torch.empty_like(a)
        for _ in range(3):
            b.copy_(a)
        torch.cuda.synchronize()
        ts = []
        for _ in range(10):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            b.copy_(a)
            e.record()
            e.synchronize()
            ts.append(s.elapsed_time(e) / 1e3)
        bw = 2 * n * 2 / statistics.median(ts)
        del a, b
        m = 8192
        x = torch.randn(m, m, dtype=torch.bfloat16, device=device)
        y = torch.randn(m, m, dtype=torch.bfloat16, device=device)
        for _ in range(3):
            x @ y
        torch.cuda.synchronize()
        ts = []
        for _ in range(10):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            x @ y
            e.record()
            e.synchronize()
            ts.append(s.elapsed_time(e) / 1e3)
        flops = 2 * m**3 / statistics.median(ts)
        del x, y
        torch.cuda.empty_cache()
        return {"copy_bw": bw, "matmul_flops": flops, "device_name": torch.cuda.get_device_name(device)}
    n = 1 << 26
    a = torch.randn(n)
    b = torch.empty_like(a)
    b.copy_(a)
    t = time.perf_counter()
    for _ in range(5):
        b.copy_(a)
    bw = 5 * 2 * n * 4 / (time.perf_counter() - t)
    m = 1024
    x, y = torch.randn(m, m), torch.randn(m, m)
    x @ y
    t = time.perf_counter()
    for _ in range(5):
        x @ y
    flops = 5 * 2 * m**3 / (time.perf_counter() - t)
    import platform

    return {"copy_bw": bw, "matmul_flops": flops, "device_name": platform.processor() or "cpu"}


# ---------------------------------------------------------------- floors
def weight_bytes(engine: Engine) -> int:
    """Weight bytes a decode step streams, as loaded (quantized weights count their packed bytes)."""
    from .engine.layers.quant import streamed_weight_bytes

    return streamed_weight_bytes(engine.model)


def kv_bytes_per_token(engine: Engine) -> int:
    """KV bytes one token adds (and a step reads per context token) as the plan sized them: an
    fp8 KV cache counts its e4m3 values and scales."""
    plan = getattr(engine, "plan", None)
    if plan is not None:
        return plan.kv_bytes_per_token
    c = engine.config
    return 2 * c.num_layers * c.num_kv_heads * c.head_dim * torch.empty((), dtype=engine.dtype).element_size()


def workload_floor(engine: Engine, ceil: dict, reqs: list[tuple[int, int]], cached_prefix: int = 0) -> float:
    """Seconds no engine built from matmuls and attention kernels can beat for these
    (input, output) requests on this device: compute time plus memory time.

    Compute: 2 FLOPs per linear-layer parameter per processed token (the LM head only
    for the tokens that are sampled), over the measured matmul rate.  Memory: the
    weights once per decode step, plus every context token's KV read once per generated
    token, over the measured copy bandwidth.  Steps = longest output, or total output /
    concurrency, where concurrency is bounded by max_running and by how many requests of
    the mean length the KV pool holds.  The two terms add because GEMMs (compute-bound) and
    decode attention (bandwidth-bound) run as separate kernels of each step; the reference
    floors for an H100 (~11,000 and ~2,990 out tok/s) follow the same model."""
    c = engine.config
    head = c.vocab_size * c.hidden_size
    body = c.num_params - head * (1 if c.tie_word_embeddings else 2)  # neither embedding nor LM head
    kvb = kv_bytes_per_token(engine)
    processed = sum(i - cached_prefix + o for i, o in reqs)
    sampled = sum(o for _, o in reqs)
    flops = 2 * body * processed + 2 * head * sampled
    mean_len = sum(i + o for i, o in reqs) / len(reqs)
    conc = max(1, min(len(reqs), engine.plan.max_running, int(engine.plan.kv_tokens // mean_len)))
    steps = max(max(o for _, o in reqs), sum(o for _, o in reqs) / conc)
    kv_read = sum(o * i + o * (o - 1) / 2 for i, o in reqs) * kvb
    bytes_ = steps * weight_bytes(engine) + kv_read
    return flops / ceil["matmul_flops"] + bytes_ / ceil["copy_bw"]


def _random_prompts(rng: random.Random, vocab: int, lens: list[int], prefix: list[int] | None = None):
    return [(prefix or []) + [rng.randrange(100, vocab - 100) for _ in range(n)] for n in lens]


def _timed(engine: Engine, prompts, outs: list[int], penalties: dict | None = None) -> float:
    """Seconds to generate outs[i] tokens (or outs[0] for every prompt), greedy, ignoring EOS;
    ``penalties`` (e.g. ``{"repetition_penalty": 1.1}``) go into every request's params."""
    return _timed_outputs(engine, prompts, outs, penalties)[0]


def _timed_outputs(engine: Engine, prompts, outs: list[int], penalties: dict | None = None) -> tuple[float, list]:
    """_timed's seconds and the outputs (their metrics time each request)."""
    if engine.core.profile is not None:  # LOCALSGL_DEBUG_PROFILE_STEPS=1: profile only the last timed run
        from .engine.step_profile import StepProfile

        engine.core.profile = StepProfile(engine.device)
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    sync()
    extra = penalties or {}
    t = time.perf_counter()
    outputs = engine.generate(prompts, [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True, **extra) for o in outs]
                    if len(outs) == len(prompts) else
                    SamplingParams(temperature=0, max_tokens=outs[0], ignore_eos=True, **extra))
    sync()
    return time.perf_counter() - t, outputs


def _decode_step(outputs) -> float | None:
    """Seconds a decode step of the whole batch, read from the request whose first token came
    last: its remaining tokens come one a step after every prompt has been prefilled (the
    T_TG / ntg of llama-batched-bench), free of the prefill's run-to-run spread that a
    difference of two timed runs carries."""
    last = max(outputs, key=lambda o: o.metrics.time_to_first_token or 0.0)
    m = last.metrics
    if m.time_to_first_token is None or m.total_time is None or m.completion_tokens < 2:
        return None
    return (m.total_time - m.time_to_first_token) / (m.completion_tokens - 1)


def _profile(engine: Engine) -> dict:
    p = engine.core.profile
    return {"step_profile": p.summary()} if p is not None else {}


# ---------------------------------------------------------------- workloads
def _penalties(a) -> dict:
    """The penalty fields asked for on the command line (none: an unpenalised run)."""
    pen = {}
    if a.repetition_penalty != 1.0:
        pen["repetition_penalty"] = a.repetition_penalty
    if a.frequency_penalty != 0.0:
        pen["frequency_penalty"] = a.frequency_penalty
    if a.presence_penalty != 0.0:
        pen["presence_penalty"] = a.presence_penalty
    return pen


def bench_latency(engine: Engine, ceil: dict, a) -> list[dict]:
    rng = random.Random(a.seed)
    vocab = engine.config.vocab_size
    rows = []
    for bs in a.batch:
        prompts = _random_prompts(rng, vocab, [a.input_len] * bs)
        _timed(engine, _random_prompts(rng, vocab, [a.input_len] * bs), [4])  # warm-up
        engine.core.cache.reset()
        t_pre = []
        t_all = []
        t_step = []
        for _ in range(a.runs):
            engine.core.cache.reset()
            t_pre.append(_timed(engine, prompts, [1]))
            engine.core.cache.reset()
            t, outputs = _timed_outputs(engine, prompts, [a.output_len])
            t_all.append(t)
            t_step.append(_decode_step(outputs))
        pre = statistics.median(t_pre)
        tot = statistics.median(t_all)
        if None in t_step:  # an output of one token: the difference of the two runs
            dec = max(tot - pre, 1e-9) / max(a.output_len - 1, 1)
        else:
            dec = statistics.median(t_step)
        step_bytes = weight_bytes(engine) + bs * (a.input_len + a.output_len / 2) * kv_bytes_per_token(engine)
        dec_floor = step_bytes / ceil["copy_bw"]
        pre_floor = 2 * engine.config.num_params * bs * a.input_len / ceil["matmul_flops"]
        rows += [
            {"workload": f"decode bs{bs} ({a.input_len} in/{a.output_len} out)", "measured": dec * 1e3, "unit": "ms/step",
             "floor": dec_floor * 1e3, "ratio": dec / dec_floor, "tok_s": bs / dec},
            {"workload": f"prefill bs{bs} x {a.input_len}", "measured": bs * a.input_len / pre, "unit": "tok/s",
             "floor": bs * a.input_len / pre_floor, "ratio": pre / pre_floor, "tok_s": bs * a.input_len / pre},
            {"workload": f"total bs{bs} ({a.input_len} in/{a.output_len} out)", "measured": bs * a.output_len / tot,
             "unit": "decode tok/s", "floor": None, "ratio": None, "tok_s": bs * (a.input_len + a.output_len) / tot,
             **_profile(engine)},
        ]
    return rows


def mixed_lengths(rng: random.Random, n: int) -> list[tuple[int, int]]:
    """The mixed workload's (prompt, output) lengths: 128-1,024 tokens in, 128-512 out."""
    return [(rng.randint(128, 1024), rng.randint(128, 512)) for _ in range(n)]


def bench_throughput(engine: Engine, ceil: dict, a) -> list[dict]:
    rng = random.Random(a.seed)
    vocab = engine.config.vocab_size
    if a.workload == "mixed":
        reqs = mixed_lengths(rng, a.num_prompts)
    else:
        reqs = [(a.input_len, a.output_len)] * a.num_prompts
    prompts = _random_prompts(rng, vocab, [i for i, _ in reqs])
    pen = _penalties(a)
    _timed(engine, prompts[: min(8, len(prompts))], [4], pen)
    engine.core.cache.reset()
    t, outputs = _timed_outputs(engine, prompts, [o for _, o in reqs], pen)
    out_tokens = sum(o for _, o in reqs)
    floor = workload_floor(engine, ceil, reqs)
    label = "".join(f" {k.split('_')[0]}={v}" for k, v in pen.items())
    return [{"workload": f"throughput {a.workload} x{len(reqs)}{label}", "measured": out_tokens / t, "unit": "out tok/s",
             "floor": out_tokens / floor, "ratio": t / floor, "tok_s": sum(i + o for i, o in reqs) / t,
             "seconds": t, "retractions": engine.stats()["retractions_total"],
             "completed": sum(len(o.token_ids) == n for o, (_, n) in zip(outputs, reqs)), **_profile(engine)}]


def bench_prefix(engine: Engine, ceil: dict, a) -> list[dict]:
    rng = random.Random(a.seed)
    vocab = engine.config.vocab_size
    shared = _random_prompts(rng, vocab, [a.prefix_len])[0]
    prompts = _random_prompts(rng, vocab, [a.input_len] * a.num_prompts, prefix=shared)
    _timed(engine, _random_prompts(rng, vocab, [64] * 4), [4])
    engine.core.cache.reset()
    t = _timed(engine, prompts, [a.output_len])
    out_tokens = a.num_prompts * a.output_len
    s = engine.stats()
    return [{"workload": f"prefix reuse {a.num_prompts}x({a.prefix_len}+{a.input_len}) out {a.output_len}",
             "measured": out_tokens / t, "unit": "out tok/s", "floor": None, "ratio": None,
             "tok_s": out_tokens / t, "seconds": t, "cache_hit_tokens": s["cache_hit_tokens"], **_profile(engine)}]


def _print(rows: list[dict], ceil: dict, engine: Engine, out=sys.stdout) -> None:
    print(f"# {ceil['device_name']}  copy {ceil['copy_bw']/1e12:.3f} TB/s  matmul {ceil['matmul_flops']/1e12:.1f} TFLOP/s  "
          f"model {engine.model_name} {engine.dtype}  weights/step {weight_bytes(engine)/1e9:.2f} GB", file=out)
    print(f"{'workload':58s} {'measured':>12s} {'unit':>13s} {'floor':>12s} {'x floor':>8s}", file=out)
    for r in rows:
        fl = "" if r["floor"] is None else f"{r['floor']:.2f}"
        ra = "" if r["ratio"] is None else f"{r['ratio']:.2f}"
        print(f"{r['workload']:58s} {r['measured']:12.2f} {r['unit']:>13s} {fl:>12s} {ra:>8s}", file=out)


def _at_least(low: int):
    """An argparse type: an integer no smaller than `low`, so a zero batch or length is refused up front."""

    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its message: "invalid integer value: 'x'"
    return parse


def _peak_reserved(device: torch.device) -> int | None:
    return torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None


def _gpu_memory(device: torch.device, start_peak: int | None) -> dict | None:
    """What the engine held on the GPU: the most torch's allocator reserved at once (start-up,
    graphs, KV pool, the timed runs), and the whole device's memory in use after them (also the
    CUDA context and what other libraries allocate): the figures to hold against --gpu-memory."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return {"peak_reserved_bytes": max(start_peak or 0, _peak_reserved(device)), "used_after_bytes": total - free}


def main(kind: str, engine_kwargs: dict, args: list[str], json_output: bool = False) -> int:
    if kind == "serving":
        from .bench_serving import main as serving_main

        return serving_main(engine_kwargs, args, json_output)
    if kind not in ("latency", "throughput", "prefix"):
        print(f"unknown benchmark {kind!r}: choose latency, throughput, prefix or serving", file=sys.stderr)
        return 2
    p = argparse.ArgumentParser(prog=f"localsgl bench {kind}")
    p.add_argument("--batch", type=_at_least(1), nargs="+", default=[1], help="latency: batch sizes, each timed")
    p.add_argument("--input-len", type=_at_least(1), default=256, help="prompt tokens (prefix: after the shared prefix)")
    p.add_argument("--output-len", type=_at_least(1), default=256, help="generated tokens a request")
    p.add_argument("--num-prompts", type=_at_least(1), default=64, help="throughput / prefix: requests")
    p.add_argument("--workload", choices=["fixed", "mixed"], default="fixed",
                   help="throughput: fixed lengths, or mixed (128-1024 in, 128-512 out)")
    p.add_argument("--prefix-len", type=_at_least(1), default=4096, help="prefix: tokens every prompt shares")
    p.add_argument("--runs", type=_at_least(1), default=3, help="timed runs (their median is reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="throughput: every request's penalty")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="throughput: every request's penalty")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="throughput: every request's penalty")
    a = p.parse_args(args)
    # these time the engine core itself: it runs in this process whatever LOCALSGL_IN_PROCESS
    # says (they reset its prefix cache between runs and count its model's bytes for the floors);
    # `bench serving` measures the core in its own process, as `serve` runs it
    engine = Engine(**{**engine_kwargs, "in_process": True})
    try:
        engine.wait_graphs()  # the large decode graphs are captured after start-up: not inside a timed run
        start_peak = _peak_reserved(engine.device)
        ceil = measure_ceilings(engine.device)
        if engine.device.type == "cuda":  # the ceilings' GiB of buffers is not the engine's
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(engine.device)
        rows = {"latency": bench_latency, "throughput": bench_throughput, "prefix": bench_prefix}[kind](engine, ceil, a)
        info = {"device": ceil, "model": engine.model_name, "dtype": str(engine.dtype), "plan": engine.plan.to_dict(),
                "gpu_memory": _gpu_memory(engine.device, start_peak),
                "load_seconds": engine.load_seconds,
                "ready_after_weights_seconds": engine.ready_after_weights_seconds,
                "graphs_ready_after_weights_seconds": engine.graphs_ready_after_weights_seconds, "rows": rows}
        if json_output:
            print(json.dumps(info, default=str))
        else:
            _print(rows, ceil, engine)
            print(f"engine ready in {engine.load_seconds:.1f} s ({engine.ready_after_weights_seconds:.1f} s after the "
                  f"weights, every decode graph {engine.graphs_ready_after_weights_seconds:.1f} s after); "
                  f"{engine.plan.describe()}", file=sys.stderr)
    finally:
        engine.shutdown()
    return 0
