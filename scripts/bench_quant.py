"""Quantized decode on the GPU in one command: batch-1 decode ms/token (256 in / 256 out) and
64 x (512 in / 128 out) decode tok/s for each weight format, random Llama-3.1-8B weights.

    python scripts/bench_quant.py [--formats bf16 int4 int8 fp8 fp8-bytes fp8-f32] [--gguf FILE ...] [--model llama-3.1-8b]
                                  [--gpu-memory 8GiB] [--runs 3] [--long-context 32768 [--long-formats bf16]]

``fp8-bytes``: fp8 with its batch-1 GEMVs on quant_gemv's byte tiles instead of the dense
full-K kernels (quant_gemv.DENSE_FP8 off; ``fp8`` is the default route); ``fp8-f32``: fp8 with the full-K
kernels' fp32 products instead of their e4m3 x fp16 ones (gemv_tiles.E4M3_FP16 off).  A ``-pf`` suffix
on any format (``int4-pf``): the batch-1 attention prefetches o_proj's weights into L2
(l2_prefetch.BEFORE_O_PROJ on); ``-pp``: that, and the quantized GEMVs' preparations prefetch
the head of their weights (quant_gemv.PREP_PREFETCH_BYTES = PREP_PF_MB MiB, default 8).
``--bs1-only``: batch-1 decode alone (A/B runs).
Each format is an Engine with ``--load-format dummy --quantization FORMAT --weights keep``
(random weights drawn in the format); each ``--gguf FILE`` is that file kept quantized
(e.g. /tmp/peer/q4km.gguf from shared/peer/build_llamacpp.sh, for the side-by-side with
llama.cpp's Q4_K_M).  The floor of a batch-1 step is the bytes it streams (the weights as
loaded, packed, plus the KV it reads) over the measured copy bandwidth.  ``--long-context N``
adds batch-1 decode (128 tokens) after an N-token prompt for each ``--long-formats`` weight
format with the bf16 KV cache and with ``--kv-cache-dtype fp8``.  Prints one JSON line per
engine, then a table."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from types import SimpleNamespace

from localsgl import bench
from localsgl.engine.api import Engine
from localsgl.engine.layers.quant import streamed_weight_bytes


def run(label: str, kwargs: dict, runs: int, bs1_only: bool = False) -> dict:
    t0 = time.time()
    engine = Engine(**kwargs)
    try:
        engine.wait_graphs()
        ceil = bench.measure_ceilings(engine.device)
        args = SimpleNamespace(seed=0, runs=runs, input_len=256, output_len=256, batch=[1], repetition_penalty=1.0,
                               frequency_penalty=0.0, presence_penalty=0.0)
        bs1 = bench.bench_latency(engine, ceil, args)
        nan = [{"tok_s": float("nan"), "measured": float("nan")}] * 3
        args.batch, args.input_len, args.output_len, args.runs = [64], 512, 128, max(1, runs - 1)
        bs64 = nan if bs1_only else bench.bench_latency(engine, ceil, args)
        # a 2k prefill takes ~40 ms: single runs spread 40-59k tok/s, so the median of at least five
        args.batch, args.input_len, args.output_len, args.runs = [1], 2048, 2, max(5, runs)
        pf2k = nan if bs1_only else bench.bench_latency(engine, ceil, args)
        row = {
            "label": label, "weights_bytes": streamed_weight_bytes(engine.model),
            "weights_format": engine.weights_estimate.describe() if engine.weights_estimate else str(engine.dtype),
            "bs1_ms": bs1[0]["measured"], "bs1_floor_ms": bs1[0]["floor"], "bs1_ratio": bs1[0]["ratio"],
            "bs1_tok_s": 1e3 / bs1[0]["measured"], "prefill_256_tok_s": bs1[1]["measured"],
            "prefill_2048_tok_s": pf2k[1]["measured"],
            "bs64_decode_tok_s": bs64[0]["tok_s"], "bs64_step_ms": bs64[0]["measured"],
            "bs64_out_tok_s_incl_prefill": bs64[2]["measured"],
            "plan": engine.plan.describe(), "device": ceil.get("device_name"), "copy_bw": ceil.get("copy_bw"),
            "seconds": time.time() - t0,
        }
    finally:
        engine.shutdown()
    print(json.dumps(row), flush=True)
    return row


def run_long(label: str, kwargs: dict, runs: int, context: int) -> dict:
    """Batch-1 decode ms/token after a ``context``-token prompt (the KV read dominates there)."""
    engine = Engine(**kwargs)
    try:
        engine.wait_graphs()
        ceil = bench.measure_ceilings(engine.device)
        args = SimpleNamespace(seed=0, runs=runs, input_len=context, output_len=128, batch=[1], repetition_penalty=1.0,
                               frequency_penalty=0.0, presence_penalty=0.0)
        r = bench.bench_latency(engine, ceil, args)[0]
        row = {"label": label, "context": context, "kv_bytes_per_token": engine.plan.kv_bytes_per_token,
               "bs1_ms": r["measured"], "bs1_floor_ms": r["floor"], "bs1_ratio": r["ratio"],
               "plan": engine.plan.describe(), "device": ceil.get("device_name")}
    finally:
        engine.shutdown()
    print(json.dumps(row), flush=True)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--formats", nargs="*", default=["bf16", "int4", "int8", "fp8"])
    p.add_argument("--gguf", nargs="*", default=[], help="GGUF files to run kept quantized")
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--gpu-memory", default=None)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--bs1-only", action="store_true", help="batch-1 decode only (no batch 64, no 2k prefill)")
    p.add_argument("--long-context", type=int, default=0, help="also batch-1 decode after this many prompt tokens")
    p.add_argument("--long-formats", nargs="*", default=["bf16"])
    a = p.parse_args()
    # 64: the largest batch here; in this process: fp8-bytes / fp8-f32 set flags of the kernels modules it imported
    base = dict(device="cuda", dtype="bfloat16", gpu_memory=a.gpu_memory, max_running=64, in_process=True)
    rows = []
    for fmt in a.formats:
        kw = dict(base, model=a.model, load_format="dummy")
        route = fmt.removesuffix("-pf").removesuffix("-pp")
        if route != "bf16":
            kw.update(quantization=route.split("-")[0], weights="keep")
        from localsgl_kernels import gemv_tiles, l2_prefetch, quant_gemv

        defaults = (quant_gemv.DENSE_FP8, gemv_tiles.E4M3_FP16, quant_gemv.PREP_PREFETCH_BYTES,
                    l2_prefetch.BEFORE_O_PROJ)
        quant_gemv.DENSE_FP8 = route != "fp8-bytes"  # the batch-1 GEMVs of quant_gemv._dense_tiles
        gemv_tiles.E4M3_FP16 = route != "fp8-f32" and defaults[1]
        l2_prefetch.BEFORE_O_PROJ = fmt.endswith(("-pf", "-pp")) or defaults[3]
        if fmt.endswith("-pp"):
            quant_gemv.PREP_PREFETCH_BYTES = int(float(os.environ.get("PREP_PF_MB", "8")) * 2**20)
        try:
            rows.append(run(fmt, kw, a.runs, a.bs1_only))
        except Exception as e:  # keep going: one failure must not hide the other figures
            print(f"FAILED {fmt}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        finally:
            (quant_gemv.DENSE_FP8, gemv_tiles.E4M3_FP16, quant_gemv.PREP_PREFETCH_BYTES,
             l2_prefetch.BEFORE_O_PROJ) = defaults
    for path in a.gguf:
        try:
            rows.append(run(path, dict(base, model=path, weights="keep"), a.runs))
        except Exception as e:
            print(f"FAILED {path}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    long_rows = []
    for fmt in a.long_formats if a.long_context else []:
        for kv in (None, "fp8"):
            kw = dict(base, model=a.model, load_format="dummy", max_running=1, max_model_len=a.long_context + 256,
                      kv_cache_dtype=kv)
            if fmt != "bf16":
                kw.update(quantization=fmt, weights="keep")
            try:
                long_rows.append(run_long(f"{fmt} / KV {kv or 'bf16'}", kw, a.runs, a.long_context))
            except Exception as e:
                print(f"FAILED long {fmt} kv={kv}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    print(f"\ntuned tiles: {os.environ.get('LOCALSGL_QUANT_TILES') or 'kernels/tuned/ for this GPU, if any'}")
    print(f"{'weights':<28} {'GiB':>6} {'bs1 ms':>8} {'floor':>7} {'x':>5} {'bs1 tok/s':>10} {'64x decode tok/s':>17}"
          f" {'prefill 2k tok/s':>17}")
    for r in rows:
        print(f"{r['label'][-28:]:<28} {r['weights_bytes'] / 2**30:6.2f} {r['bs1_ms']:8.3f} {r['bs1_floor_ms']:7.3f} "
              f"{r['bs1_ratio']:5.2f} {r['bs1_tok_s']:10.1f} {r['bs64_decode_tok_s']:17.0f} {r['prefill_2048_tok_s']:17.0f}")
    for r in long_rows:
        print(f"{r['label']:<28} bs1 after {r['context']:,} tokens: {r['bs1_ms']:.3f} ms (floor {r['bs1_floor_ms']:.3f}, "
              f"x{r['bs1_ratio']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
