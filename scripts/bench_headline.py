"""Headline GPU benchmarks (Llama-3.1-8B, dummy bf16 weights); prints one table.

Run by scripts/device_check.sh on the device machine; each workload builds its own Engine."""
from __future__ import annotations

import io
import json
import os
import sys
import time

from localsgl import bench

MODEL = dict(model="llama-3.1-8b", load_format="dummy", dtype="bfloat16", device="cuda")

QUICK = [
    ("latency", {}, ["--batch", "1", "--input-len", "256", "--output-len", "256", "--runs", "3"]),
    ("latency", {}, ["--batch", "1", "--input-len", "2048", "--output-len", "4", "--runs", "3"]),
    ("latency", {}, ["--batch", "64", "--input-len", "512", "--output-len", "128", "--runs", "2"]),
]
FULL = [
    ("throughput", {}, ["--workload", "mixed", "--num-prompts", "1000"]),
    ("throughput", {}, ["--workload", "fixed", "--num-prompts", "64", "--input-len", "4096", "--output-len", "2048"]),
    ("prefix", {}, ["--num-prompts", "64", "--prefix-len", "4096", "--input-len", "128", "--output-len", "256"]),
    ("prefix", {"disable_radix_cache": True}, ["--num-prompts", "64", "--prefix-len", "4096", "--input-len", "128", "--output-len", "256"]),
    ("latency", {"disable_cuda_graph": True}, ["--batch", "1", "--input-len", "256", "--output-len", "64", "--runs", "2"]),
]


CAPS = [  # under every --gpu-memory cap the throughput workload runs to the end (retraction, no OOM)
    ("throughput", {"model": "llama-3.2-1b", "gpu_memory": cap}, ["--workload", "mixed", "--num-prompts", "300"])
    for cap in ("8GiB", "12GiB")
] + [
    ("throughput", {"gpu_memory": cap}, ["--workload", "mixed", "--num-prompts", "300"]) for cap in ("24GiB", "40GiB")
]
# the small card: Llama-3.1-8B in int4 under an 8 GiB cap (bf16 and fp8 KV) runs the mixed
# throughput workload to the end (retraction, no OOM)
QCAPS = [("throughput", {"quantization": "int4", "gpu_memory": "8GiB", **kv}, ["--workload", "mixed", "--num-prompts", "1000"])
         for kv in ({}, {"kv_cache_dtype": "fp8"})]
BS1 = [QUICK[0], ("latency", {"_pdl": False}, QUICK[0][2]),  # programmatic dependent launch on vs off
       ("latency", {"_fused_decode": False}, QUICK[0][2])]  # fused one-token path on vs off
LONG = [("throughput", {}, ["--workload", "fixed", "--num-prompts", "500", "--input-len", "4096", "--output-len", "2048"])]
_PEN_ARGS = ["--workload", "fixed", "--num-prompts", "64", "--input-len", "512", "--output-len", "256"]
PENALTY = [("throughput", {}, _PEN_ARGS),  # 64 concurrent, plain vs repetition-penalised (device-side counts)
           ("throughput", {"_penalty": 1.1}, _PEN_ARGS + ["--repetition-penalty", "1.1"])]
# mixed prefill+decode steps eager vs piecewise graphs (piecewise_graph.py, both forced), 1B then 8B; each pair
# twice: the bench's warm-up reaches few of the mixed steps' kernel variants, so the first pair
# compiles some inside its timed run on a fresh machine; compare the second pair
_MIXED_ARGS = ["--workload", "mixed", "--num-prompts", "1000"]
MIXED = [("throughput", {"model": m, **p}, _MIXED_ARGS) for m in ("llama-3.2-1b", "llama-3.1-8b")
         for _ in range(2) for p in ({"_piecewise": False}, {"_piecewise": True})]


def set_debug_switches(**values: bool) -> None:
    """Set the LOCALSGL_DEBUG_* variables the next Engine reads (docs/switches.md): a switch
    at its default has no variable, any other value sets it."""
    from localsgl.engine.debug_switches import DEFAULT, variable

    for name, value in values.items():
        if value == getattr(DEFAULT, name):
            os.environ.pop(variable(name), None)
        elif getattr(DEFAULT, name) is None:  # an automatic switch: 1 forces it on, 0 off
            os.environ[variable(name)] = "1" if value else "0"
        else:
            os.environ[variable(name)] = "1"


def main():
    mode = sys.argv[1] if len(sys.argv) > 1 else "full"
    main_set = QUICK + [FULL[0], FULL[2], FULL[3]]  # + mixed throughput and the prefix-reuse pair
    prof_set = [QUICK[0], FULL[0], FULL[2], FULL[3]]  # bs1 decode, mixed throughput, prefix pair
    prefix_set = [QUICK[0], FULL[2], FULL[3]]
    plan = {"quick": QUICK, "full": FULL, "all": QUICK + FULL, "main": main_set, "prof": prof_set, "prefix": prefix_set,
            "tput": [FULL[0]], "caps": CAPS, "qcaps": QCAPS, "tputcaps": [FULL[0]] + CAPS, "long": LONG, "bs1": BS1,
            "quick+": QUICK + BS1[1:], "penalty": PENALTY, "quick+penalty": QUICK + PENALTY, "mixed": MIXED,
            "mixed1b": MIXED[:4], "mixed8b": MIXED[6:], "none": []}[mode]
    table = []
    for kind, extra, args in plan:
        buf = io.StringIO()
        old = sys.stdout
        sys.stdout = buf
        t = time.time()
        set_debug_switches(fused_decode=extra.get("_fused_decode", True), pdl=extra.get("_pdl", True),
                           piecewise_graphs=extra.get("_piecewise"))
        try:
            rc = bench.main(kind, {**MODEL, **{k: v for k, v in extra.items() if not k.startswith("_")}}, args,
                            json_output=True)
        except Exception as e:  # keep going: one failure must not hide the other figures
            sys.stdout = old
            print(f"FAILED {kind} {extra} {args}: {type(e).__name__}: {e}", flush=True)
            continue
        finally:
            sys.stdout = old
        info = json.loads(buf.getvalue().strip().splitlines()[-1])
        print(json.dumps(info), flush=True)
        for r in info["rows"]:
            tag = (" " + ",".join(f"{k}={v}" for k, v in extra.items())) if extra else ""
            if "completed" in r:  # the throughput workloads: every request's tokens, retractions
                tag += f" done={r['completed']} retr={r['retractions']}"
            if "gpu_memory" in extra and info.get("gpu_memory"):  # a cap: what the engine held against it
                gm = info["gpu_memory"]
                tag += f" peak={gm['peak_reserved_bytes'] / 2**30:.2f}GiB used={gm['used_after_bytes'] / 2**30:.2f}GiB"
            table.append((r["workload"] + tag, r["measured"], r["unit"], r["floor"], r["ratio"], info["load_seconds"],
                          info.get("ready_after_weights_seconds", float("nan")),
                          info.get("graphs_ready_after_weights_seconds") or float("nan")))
        print(f"[{kind} {args} done in {time.time()-t:.0f}s]", flush=True)
    print()
    print(f"{'workload':66s} {'measured':>10s} {'unit':>13s} {'floor':>10s} {'x floor':>7s} {'ready s':>7s} {'after w':>7s} "
          f"{'graphs':>7s}")
    for w, m, u, f, r, l, aw, gw in table:
        print(f"{w:66s} {m:10.2f} {u:>13s} {'' if f is None else f'{f:.2f}':>10s} {'' if r is None else f'{r:.2f}':>7s} "
              f"{l:7.1f} {aw:7.1f} {gw:7.1f}")


if __name__ == "__main__":
    main()
