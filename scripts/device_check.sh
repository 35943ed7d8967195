#!/usr/bin/env bash
# GPU tests + headline benchmarks on the lent device machine; a short table last.
# Usage (device tool): bash scripts/device_check.sh [quick|main|full|all|bs1|qcaps|mixed|mixed1b|...] [tests|notests] [probe] [gemvprobe] [mixedprobe] [serving] [serving1b] [startup] [ncu] [peer] [fp8dense] [gemmsweep] [gemmab] [rowstack] [int8act] [structured] [rows] [a8] [steps] [l2pf] [tune]
#   (qcaps: Llama-3.1-8B in int4 under --gpu-memory 8GiB, the 1,000-prompt mixed workload with bf16 and fp8 KV:
#    requests completed, retractions, the engine's peak GPU memory against the cap; scripts/probe_memory.py says
#    where it goes;
#    mixed / mixed1b / mixed8b: the 1,000-prompt mixed workload, eager vs piecewise mixed steps: 1B and 8B twice /
#    1B twice / 8B once;
#    mixedprobe: scripts/probe_mixed.py, one mixed step's host and device time per path, for MIXED_PROBE_MODELS)
#   (peer: llama.cpp built from .peer in the background from the start, then llama-bench on its Q4_K_M file beside
#    bench_quant's int4 and that file kept quantized, and llama-batched-bench at 64 x (512 / 128): carry .peer;
#    PEER_WAIT s for the build, default 420; PEER_OURS=0: llama.cpp's figures only; PEER_FORMATS: bench_quant's
#    formats beside the file, default int4 ("bf16 int4" adds the batch-64 reference), PEER_TIMEOUT s, default 240)
#   (startup: scripts/bench_start_gpu.py, the default against the deferred batch-1 graph, a py-spy profile of one
#    start when .whl holds py-spy, then scripts/probe_load.py)
#   (int8act: scripts/probe_quant_tiles.py --words 3: the batch-1 GEMVs over int8 activations and dp4a against
#    each shape's default tile, per format of INT8ACT_FORMATS)
#   (ncu: Nsight Compute's full sections on the batch-1 quantized GEMVs, scripts/ncu_quant_gemv.py, to $OUT/ncu.txt;
#    NCU_ROWS=64 NCU_KERNELS=_qgemm: the decode batch's GEMMs instead (NCU_KERNELS=_a8 NCU_A8=<tile>: quant_a8's); NCU_DENSE=fp8|bf16: gemv.py's dense batch-1
#    GEMVs, fp8 batch 1's route, through scripts/ncu_gemv.py; NCU_GEMV_KINDS: of qkv,gate_up,o,down, default all but qkv)
#   (serving1b: `bench serving` of llama-3.2-1b, mixed 1,000 prompts at rate inf, client in its own process,
#    with the engine core in-process and in its own process; each against its offline run;
#    SERVING_HTTP_CLIENT=httpx: the client the fourth session measured with; SERVING1B_MODES="0": the core process alone)
#   (env TESTS: pytest targets instead of tests/gpu tests/kernels)
#   (logs under $OUT when set; LOCALSGL_DEBUG_PROFILE_STEPS=1 adds per-step GPU/host timing to the JSON rows)
#   (fp8dense: scripts/bench_quant.py --formats bf16 fp8 fp8-bytes: fp8 batch 1 through the dense GEMVs (the
#    default, quant_gemv.DENSE_FP8) and through the byte tiles; FP8_FORMATS="fp8-f32 fp8 fp8-f32 fp8": the dense
#    GEMVs' fp32 products against their e4m3 x fp16 ones (gemv_tiles.E4M3_FP16, the default), alternated)
#   (gemmsweep: the 16/64-row GEMM tiles of SWEEP_FORMATS (default int4g128 int4g32; int8g16: a Q4_K_M file's
#    Q6_K parts) swept (scripts/probe_quant_tiles.py, the words variant and split-K included) and merged over
#    kernels/tuned/<GPU>.json into $OUTDIR/merged_tiles.json, then scripts/bench_quant.py --formats bf16 int4
#    (SWEEP_BENCH; SWEEP_RUNS runs, default 3) with the tuned file and with the merged one, and SWEEP_GGUF (a GGUF
#    file; a random Q4_K_M-layout one, scripts/random_q4km_gguf.py, written there during the sweep if missing)
#    with both when set)
#   (gemmab: scripts/probe_quant_tiles.py --ab: each int4 GEMM shape's default tile against the same tile with the
#    Config fields of GEMM_AB replaced, then scripts/bench_quant.py (AB_BENCH formats) alternately with the tuned
#    file and with GEMM_AB's first variant applied to its int4 GEMM entries (AB_SECOND=ab_best: each shape's
#    fastest tile of the probe, for the AB_ROWS timed), AB_PAIRS times)
#   (rows: scripts/probe_quant_rows.py, the few-row int8-activation matmul against the 16-row GEMM at 2 / 4 / 8
#    rows, its entries written into $OUTDIR/rows_tiles.json; then `bench latency` at batch 1 2 4 8 16 of int4 with
#    the tuned file and with that one, and of bf16; ROWS_PROBE=0: the tuned file's rows entries, no probe;
#    ROWS_GGUF: a GGUF file timed the same way, a random Q4_K_M-layout one written there if missing)
#   (a8: scripts/probe_quant_a8.py, the int4 x int8-activation GEMM against the GEMM's tuned tile at 16 / 64
#    rows, its entries written into $OUTDIR/a8_tiles.json; then scripts/bench_quant.py (A8_BENCH formats, default
#    bf16 int4; A8_RUNS runs) with the tuned file without its a8 entries and with that one, A8_PAIRS times;
#    A8_TILES: that file from an earlier probe instead, e.g. kernels/tuned/<GPU>.json as committed; A8_ROWS: the
#    probe's row buckets (e.g. 64); A8_BASE: the file the winners are benched against instead of the one without
#    a8 entries)
#   (rowstack: scripts/probe_qkv_stack.py (one qkv layer's kernel: joined, stacked, its variants), then
#    scripts/random_q4km_gguf.py's Q4_K_M-layout file and scripts/bench_row_stack.py: batch 1 with
#    the fused q/k/v in their own formats (quant.row_runs) and joined in one, stack / joined / stack)
#   (l2pf: scripts/bench_quant.py --bs1-only over L2PF_FORMATS, default each of int4 / fp8 without and with the
#    L2 prefetches (-pf: the attention's of o_proj, -pp: and the preparations'), alternated, then bf16 / bf16-pf)
#   (steps: scripts/probe_step_kernels.py, one batch-1 step's device time kernel by kernel with PDL off, for each
#    format of STEP_FORMATS (default int4 fp8))
#   (tune: scripts/tune_tiles.sh, a tuned-tiles file for this GPU (GEMVs, GEMM tiles, rows and a8 routes) written to $OUTDIR/<GPU>.json,
#    int4 timed with the packaged file and with it; its TUNE_* settings)
#   (structured: scripts/bench_structured.py, JSON-schema vs free decoding at batch 1 and 64; needs the
#    wheels of scripts/device_wheels.sh in .whl/)
set -uo pipefail
cd "$(dirname "$0")/.."
MODE="${1:-full}"; shift || true
EXTRA=" $* "
OUTDIR="${OUT:-/tmp/localsgl-device}"; mkdir -p "$OUTDIR"
# wheels compiled to .pyc as pip does for users: `run` imports pydantic (through typer) once it is
# there, and start-up timings must not include compiling it from source on every start
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
# make `localsgl_kernels` importable without installing the package
mkdir -p /tmp/klink && ln -sfn "$PWD/kernels" /tmp/klink/localsgl_kernels
export PYTHONPATH="$PWD:/tmp/klink:${PYTHONPATH:-}"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUTDIR/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
python3 -c "import torch; from localsgl_kernels import pdl; print('PDL', pdl.enabled(torch.device('cuda')), 'driver', pdl._driver_version())"

# peer: llama.cpp built from .peer (../shared/peer) in the background while the rest runs; measured
# side by side at the end (needs ~700 s on 16 cores before its GGUF exists; while it builds, the
# engine's own timings here are perturbed: int4 batch 1 measured 2.4-3.1 ms against 1.93 quiet).
# One build at a time: a call that finds one running (started by an earlier call) waits for it.
if [[ "$EXTRA" == *" peer "* ]] && [ -d .peer ] && ! grep -q "all done" /tmp/peer/build.done 2>/dev/null \
    && ! pgrep -f build_llamacpp.sh > /dev/null; then
  setsid nohup bash .peer/build_llamacpp.sh "$PWD/.peer" > /tmp/peerbuild.log 2>&1 < /dev/null &
fi

if [[ "$EXTRA" != *" notests "* ]]; then
  echo "== GPU tests"
  TESTDIRS="tests/gpu"; [ -d tests/kernels ] && ls tests/kernels/test_*.py >/dev/null 2>&1 && TESTDIRS="$TESTDIRS tests/kernels"
  # -v: each test's outcome is in the log as it happens, so a run the timeout cuts still names its failures
  timeout ${TESTS_TIMEOUT:-1800} python3 -m pytest -v -rfE --durations=15 ${TESTS:-$TESTDIRS} -p no:cacheprovider 2>&1 \
    | tee "$OUTDIR/gpu_tests.log" | grep -E " (FAILED|ERROR)|^(FAILED|ERROR) |[0-9] (passed|failed)|s (call|setup) " | tail -40
fi
if [[ "$EXTRA" == *" probe "* ]]; then
  echo "== probes"
  python3 scripts/probe_gpu.py ${PROBES:-shared kernels} 2>&1 | tee "$OUTDIR/probe.log"
fi
if [[ "$EXTRA" == *" gemvprobe "* ]]; then
  echo "== batch-1 weight-stream probe"
  python3 scripts/probe_gemv.py ${GEMV_PROBES:-layers tiles} 2>&1 | tee "$OUTDIR/probe_gemv.log"
fi
if [[ "$EXTRA" == *" int8act "* ]]; then
  echo "== batch-1 GEMVs over int8 activations (dp4a, words 3) against the default tile (words 2)"
  timeout ${INT8ACT_TIMEOUT:-300} python3 scripts/probe_quant_tiles.py --formats ${INT8ACT_FORMATS:-int4g128 int4g32 int8g16} \
    --kinds gemv --words 3 --jobs 16 --json "$OUTDIR/int8act_rows.json" > "$OUTDIR/int8act.log" 2>&1
  grep -E "^int.* gemv " "$OUTDIR/int8act.log"
fi
if [[ "$EXTRA" == *" ncu "* ]]; then
  echo "== Nsight Compute on the batch-1 quantized GEMVs (NCU_FMT, default int4g128)"
  if [ -n "${NCU_DENSE:-}" ]; then  # gemv.py's dense GEMVs over e4m3 (NCU_DENSE=fp8) or bf16 (NCU_DENSE=bf16)
    timeout ${NCU_TIMEOUT:-240} ncu --clock-control none --set full -k regex:'fullk|_gemv_kernel' \
      python3 scripts/ncu_gemv.py --calls 1 $([ "$NCU_DENSE" = bf16 ] && echo --bf16) ${NCU_GEMV_KINDS:+--kinds $NCU_GEMV_KINDS} \
      > "$OUTDIR/ncu.txt" 2>&1
  else
    timeout ${NCU_TIMEOUT:-240} ncu --clock-control none --set full -k regex:${NCU_KERNELS:-'_qgemv|_qnorm|_prep|tinygemm|int4'} \
      python3 scripts/ncu_quant_gemv.py --fmt ${NCU_FMT:-int4g128} --calls 1 --rows ${NCU_ROWS:-1} ${NCU_A8:+--a8 $NCU_A8} \
      > "$OUTDIR/ncu.txt" 2>&1
  fi
  grep -E "^  [_a-zA-Z].*Context|Duration|DRAM Throughput|L1/TEX Cache Throughput|L2 Cache Throughput|Issue Slots Busy|Registers Per|Achieved Occupancy|Warp Cycles Per Issued|Grid Size|Block Size" \
    "$OUTDIR/ncu.txt" | cut -c1-110 | head -80
fi
if [[ "$EXTRA" == *" l2pf "* ]]; then
  echo "== batch 1 without and with the L2 prefetches (kernels/l2_prefetch.py), alternated"
  timeout ${L2PF_TIMEOUT:-420} python3 scripts/bench_quant.py --bs1-only --runs 3 \
    --formats ${L2PF_FORMATS:-int4 int4-pf int4-pp fp8 fp8-pf int4 int4-pf int4-pp fp8 fp8-pf bf16 bf16-pf} \
    > "$OUTDIR/l2pf.log" 2>&1
  grep -v "^{" "$OUTDIR/l2pf.log" | tail -18
fi
if [[ "$EXTRA" == *" tune "* ]]; then
  echo "== a tuned-tiles file for this GPU (scripts/tune_tiles.sh)"
  # streamed, not tailed: a call cut by its time limit still shows how far the probes got
  OUT="$OUTDIR" bash scripts/tune_tiles.sh 2>&1 | tee "$OUTDIR/tune.log" | grep -vE "Warning|warn_once"
fi
if [[ "$EXTRA" == *" steps "* ]]; then
  echo "== one batch-1 step kernel by kernel (PDL off, graphs off)"
  for f in ${STEP_FORMATS:-int4 fp8}; do
    LOCALSGL_DEBUG_NO_PDL=1 timeout ${STEP_TIMEOUT:-180} python3 scripts/probe_step_kernels.py --quantization "$f" \
      --steps 32 --top 16 2>&1 | tee "$OUTDIR/steps_$f.log" | grep -v '^ *$' | tail -24
  done
fi
if [[ "$EXTRA" == *" mixedprobe "* ]]; then
  echo "== mixed-step probe: host vs device time, eager vs piecewise graphs"
  for m in ${MIXED_PROBE_MODELS:-llama-3.2-1b llama-3.1-8b}; do
    python3 scripts/probe_mixed.py --model "$m" 2>&1 | tee "$OUTDIR/probe_mixed_$m.log" | tail -22
  done
fi
if [[ "$EXTRA" == *" serving "* ]]; then
  echo "== serving vs offline, llama-3.1-8b mixed, engine core in its own process (serve's default)"
  LOCALSGL_IN_PROCESS=0 timeout ${SERVING_TIMEOUT:-900} python3 -m localsgl.cli bench serving -m llama-3.1-8b \
    --load-format dummy --dtype bfloat16 --workload mixed --num-prompts ${SERVING_PROMPTS:-400} --client process \
    --request-rate ${SERVING_RATES:-8 inf} --http-client ${SERVING_HTTP_CLIENT:-raw} 2>&1 | tee "$OUTDIR/serving.log" | tail -20
fi
if [[ "$EXTRA" == *" serving1b "* ]]; then
  echo "== serving vs offline, llama-3.2-1b mixed 1,000 prompts, rate inf: engine core on a thread (1) vs in its own process (0)"
  for inproc in ${SERVING1B_MODES:-1 0}; do
    LOCALSGL_IN_PROCESS=$inproc python3 -m localsgl.cli bench serving -m llama-3.2-1b --load-format dummy --dtype bfloat16 \
      --workload mixed --num-prompts 1000 --request-rate inf --client process --http-client ${SERVING_HTTP_CLIENT:-raw} \
      --output-json "$OUTDIR/serving1b_inprocess$inproc.json" 2>&1 | tee "$OUTDIR/serving1b_inprocess$inproc.log" | tail -12
  done
fi

if [[ "$EXTRA" == *" startup "* ]]; then
  echo "== command to first token (random Llama-3.1-8B safetensors, warm page and Triton caches)"
  # "deferred": no decode graph before serving (the batch-1 graph is captured between the first steps)
  timeout ${STARTUP_TIMEOUT:-240} python3 scripts/bench_start_gpu.py --runs ${STARTUP_RUNS:-3} --importtime --out "$OUTDIR" \
    --variant deferred:LOCALSGL_DEBUG_STARTUP_GRAPH=0 --answer-tokens 128 2>&1 | tee "$OUTDIR/startup.log" | grep -v '^ ' | tail -20
  if [ -x /tmp/site/bin/py-spy ]; then  # py-spy from .whl (scripts/device_wheels.sh)
    echo "== where one start's time goes (py-spy, inclusive samples; raw stacks in startup_pyspy.raw)"
    # the bytecode cache bench_start_gpu.py filled where the image's packages carry no .pyc
    [ -d /tmp/localsgl-pycache ] && export PYTHONPYCACHEPREFIX=/tmp/localsgl-pycache
    echo hi | timeout 90 /tmp/site/bin/py-spy record --rate 250 --format raw --nonblocking -o "$OUTDIR/startup_pyspy.raw" \
      -- python3 -m localsgl.cli -v run -m /tmp/start-llama8b --max-tokens 1 > "$OUTDIR/startup_pyspy.log" 2>&1
    python3 - "$OUTDIR/startup_pyspy.raw" <<'PY'
import collections, sys
total, incl = 0, collections.Counter()
for line in open(sys.argv[1]):
    stack, _, n = line.rstrip().rpartition(" ")
    if not n.isdigit():
        continue
    total += int(n)
    for frame in {f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0] + ")" for f in stack.split(";")}:
        incl[frame] += int(n)
print(f"{total} samples at 250/s")
for frame, n in incl.most_common(25):
    print(f"{n / 250:6.2f} s  {100 * n / max(total, 1):5.1f} %  {frame}")
PY
  fi
  echo "== the checkpoint's load: page cache -> pinned -> device, alone and together"
  timeout ${LOAD_PROBE_TIMEOUT:-150} python3 scripts/probe_load.py --repeat ${LOAD_PROBE_REPEAT:-1} 2>&1 | tee "$OUTDIR/probe_load.log" | tail -14
fi
if [[ "$EXTRA" == *" structured "* ]]; then
  echo "== structured decoding: JSON schema vs free (Llama-3.1-8B shapes, dummy bf16 weights, Llama 3 tokenizer)"
  timeout ${STRUCTURED_TIMEOUT:-480} python3 scripts/bench_structured.py --model llama-3.1-8b --load-format dummy \
    --dtype bfloat16 --device cuda --batches 1 64 --tokenizer llama3 --repeats ${STRUCTURED_REPEATS:-5} 2>&1 \
    | tee "$OUTDIR/structured.log" | grep -v " INFO " | tail -20
fi
if [[ "$EXTRA" == *" fp8dense "* ]]; then
  echo "== fp8 batch 1: the quantized GEMVs vs the dense ones with row scales (quant_gemv.DENSE_FP8), bf16 beside"
  timeout ${FP8_TIMEOUT:-420} python3 scripts/bench_quant.py --formats ${FP8_FORMATS:-bf16 fp8 fp8-bytes} --runs ${FP8_RUNS:-3} \
    > "$OUTDIR/fp8dense.log" 2>&1
  grep -E '^\{|FAILED' "$OUTDIR/fp8dense.log" | python3 -c "
import json, sys
for line in sys.stdin:
    if line.startswith('{'):
        r = json.loads(line)
        print(f\"{r['label']:10s} bs1 {r['bs1_ms']:.3f} ms = {r['bs1_ratio']:.2f}x floor; 64x {r['bs64_decode_tok_s']:.0f} tok/s; prefill 2k {r['prefill_2048_tok_s']:.0f} tok/s\")
    else:
        print(line.rstrip())"
fi
if [[ "$EXTRA" == *" gemmsweep "* ]]; then
  echo "== GEMM tiles at 16 / 64 rows, swept and merged, then int4 batch 64 with the tuned and the merged tiles"
  echo '[]' > "$OUTDIR/no_tiles.json"
  gpu_file="kernels/tuned/$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '_').json"
  [ -f "$gpu_file" ] || { echo '[]' > "$OUTDIR/tuned_now.json"; gpu_file="$OUTDIR/tuned_now.json"; }
  # SWEEP_GGUF that does not exist yet: a random Q4_K_M-layout file there (no llama.cpp build needed), written
  # on the CPU while the sweep runs
  gguf_pid=""
  if [ -n "${SWEEP_GGUF:-}" ] && [ ! -f "$SWEEP_GGUF" ]; then
    python3 scripts/random_q4km_gguf.py "$SWEEP_GGUF" > "$OUTDIR/random_gguf.log" 2>&1 & gguf_pid=$!
  fi
  LOCALSGL_QUANT_TILES="$OUTDIR/no_tiles.json" timeout ${SWEEP_TIMEOUT:-300} python3 scripts/probe_quant_tiles.py \
    --formats ${SWEEP_FORMATS:-int4g128 int4g32} --kinds gemm --jobs 16 --json "$OUTDIR/gemm_rows.json" \
    --tiles "$OUTDIR/gemm_tiles.json" > "$OUTDIR/gemm_sweep.log" 2>&1
  grep -E "^int.* gemm " "$OUTDIR/gemm_sweep.log"
  [ -n "$gguf_pid" ] && wait "$gguf_pid"
  python3 scripts/merge_tiles.py "$gpu_file" "$OUTDIR/gemm_rows.json" "$OUTDIR/gemm_tiles.json" -o "$OUTDIR/merged_tiles.json"
  for tiles in "$gpu_file" "$OUTDIR/merged_tiles.json"; do
    echo "-- tiles: $tiles"
    LOCALSGL_QUANT_TILES="$tiles" timeout 240 python3 scripts/bench_quant.py --formats ${SWEEP_BENCH:-bf16 int4} \
      --runs ${SWEEP_RUNS:-3} \
      ${SWEEP_GGUF:+--gguf "$SWEEP_GGUF"} 2>&1 | grep -vE '^\{| INFO ' | tail -4
  done
fi
if [[ "$EXTRA" == *" gemmab "* ]]; then
  echo "== GEMM tiles A/B: each int4 shape's default tile against GEMM_AB's variants, then batch 64 with both"
  timeout ${AB_TIMEOUT:-300} python3 scripts/probe_quant_tiles.py --formats ${AB_FORMATS:-int4g128 int4g32} \
    --ab ${GEMM_AB:-half_math=1,scale_after=0} --ab-rows ${AB_ROWS:-16 64} --ab-tiles "$OUTDIR/ab_tiles.json" \
    --ab-best "$OUTDIR/ab_best.json" 2>&1 \
    | tee "$OUTDIR/gemm_ab.log" | grep -vE "Warning|warn_once"
  for pair in $(seq 1 ${AB_PAIRS:-2}); do
    for tiles in "" "$OUTDIR/${AB_SECOND:-ab_tiles}.json"; do
      echo "-- tiles: ${tiles:-tuned}"
      LOCALSGL_QUANT_TILES="$tiles" timeout 240 python3 scripts/bench_quant.py --formats ${AB_BENCH:-int4} \
        --runs ${AB_RUNS:-2} 2>&1 | grep -vE '^\{| INFO ' | tail -3
    done
  done
fi
if [[ "$EXTRA" == *" rows "* ]]; then
  echo "== few-row int8-activation matmul vs the 16-row GEMM, then decode at batch 1-16"
  gguf_pid=""  # ROWS_GGUF not there yet: a random Q4_K_M-layout file, written on the CPU meanwhile
  if [ -n "${ROWS_GGUF:-}" ] && [ ! -f "$ROWS_GGUF" ]; then
    python3 scripts/random_q4km_gguf.py "$ROWS_GGUF" > "$OUTDIR/random_gguf.log" 2>&1 & gguf_pid=$!
  fi
  if [ "${ROWS_PROBE:-1}" = 0 ]; then  # the tuned file's own rows entries, no probe
    python3 -c "
import json, sys, torch; from localsgl_kernels.quant_tiles import _entries
json.dump(_entries(torch.cuda.current_device(), None), open(sys.argv[1], 'w'))" "$OUTDIR/rows_tiles.json"
  else
    timeout ${ROWS_TIMEOUT:-300} python3 scripts/probe_quant_rows.py --formats ${ROWS_FORMATS:-int4g128 int4g32 int8g16} \
      --out "$OUTDIR/rows_tiles.json" 2>&1 | tee "$OUTDIR/rows_probe.log" | grep -vE "Warning|warn_once"
  fi
  # the tuned file without its rows entries: the 16-row GEMM at 2..8 rows, as before quant_rows
  python3 -c "
import json, sys, torch; from localsgl_kernels.quant_tiles import _entries
json.dump([e for e in _entries(torch.cuda.current_device(), None) if e['kind'] != 'rows'], open(sys.argv[1], 'w'))" \
    "$OUTDIR/norows_tiles.json"
  # ROWS_GGUF (a GGUF file, e.g. llama.cpp's Q4_K_M of the peer step): that file kept quantized as well
  [ -n "$gguf_pid" ] && wait "$gguf_pid"
  for spec in "int4:$OUTDIR/norows_tiles.json" "int4:$OUTDIR/rows_tiles.json" "bf16:" \
      ${ROWS_GGUF:+"gguf:$OUTDIR/norows_tiles.json" "gguf:$OUTDIR/rows_tiles.json"}; do
    echo "-- ${spec%%:*} tiles ${spec#*:}"
    LOCALSGL_QUANT_TILES="${spec#*:}" timeout 200 python3 -c "
import sys; from localsgl import bench
q, gguf = sys.argv[1], sys.argv[2]
spec = dict(model=gguf, weights='keep') if q == 'gguf' else dict(model='llama-3.1-8b', load_format='dummy')
if q == 'int4':
    spec['quantization'] = q
bench.main('latency', spec, ['--batch', '1', '2', '4', '8', '16', '--input-len', '512', '--output-len', '128', '--runs', '3'])" \
      "${spec%%:*}" "${ROWS_GGUF:-}" 2>&1 | grep -E "^decode|Error"
  done
fi
if [[ "$EXTRA" == *" a8 "* ]]; then
  echo "== int4 x int8-activation GEMM vs the GEMM's tuned tile at 16 / 64 rows, then batch 64 with its winners"
  if [ -n "${A8_TILES:-}" ]; then  # a tuned file with a8 entries from an earlier probe: no probe
    cp "$A8_TILES" "$OUTDIR/a8_tiles.json"
  else
    timeout ${A8_TIMEOUT:-300} python3 scripts/probe_quant_a8.py --out "$OUTDIR/a8_tiles.json" \
      ${A8_ROWS:+--rows $A8_ROWS} 2>&1 \
      | tee "$OUTDIR/a8_probe.log" | grep -vE "Warning|warn_once"
  fi
  # the tuned file without its a8 entries: the GEMM at 16+ rows, as before quant_a8
  python3 -c "
import json, sys, torch; from localsgl_kernels.quant_tiles import _entries
json.dump([e for e in _entries(torch.cuda.current_device(), None) if e['kind'] != 'a8'], open(sys.argv[1], 'w'))" \
    "$OUTDIR/noa8_tiles.json"
  for pair in $(seq 1 ${A8_PAIRS:-1}); do
    for tiles in "${A8_BASE:-$OUTDIR/noa8_tiles.json}" "$OUTDIR/a8_tiles.json"; do
      echo "-- tiles: $tiles"
      LOCALSGL_QUANT_TILES="$tiles" timeout 240 python3 scripts/bench_quant.py --formats ${A8_BENCH:-bf16 int4} \
        --runs ${A8_RUNS:-2} 2>&1 | grep -vE '^\{| INFO ' | tail -3
    done
  done
fi
if [[ "$EXTRA" == *" rowstack "* ]]; then
  echo "== a Q4_K_M file kept quantized (random blocks): q/k/v in their own formats vs joined, batch 1"
  timeout 120 python3 scripts/probe_qkv_stack.py 2>&1 | tee "$OUTDIR/qkv_stack.log" | grep -v Warning
  [ -f /tmp/q4km_rand.gguf ] || python3 scripts/random_q4km_gguf.py /tmp/q4km_rand.gguf
  timeout ${ROWSTACK_TIMEOUT:-240} python3 scripts/bench_row_stack.py /tmp/q4km_rand.gguf --modes stack joined stack \
    2>&1 | tee "$OUTDIR/row_stack.log" | grep -E '^\{|Error'
fi
if [[ "$EXTRA" == *" peer "* ]]; then
  echo "== int4 g128 and the Q4_K_M file kept quantized vs llama.cpp on that file, same lease"
  for _ in $(seq 1 $(( ${PEER_WAIT:-420} / 5 ))); do grep -q "all done" /tmp/peer/build.done 2>/dev/null && break; sleep 5; done
  cat /tmp/peer/build.done 2>/dev/null
  if grep -q "all done" /tmp/peer/build.done 2>/dev/null; then
    timeout 120 /tmp/peer/llamacpp/build/bin/llama-bench -m /tmp/peer/q4km.gguf -ngl 99 -fa 1 -p 0 -n 128 -r 3 -o json \
      > "$OUTDIR/llama_bench.json" 2> "$OUTDIR/llama_bench.err"
    # batch 64 as bench_quant runs it: 64 prompts of 512 tokens, 128 generated each
    timeout 180 /tmp/peer/llamacpp/build/bin/llama-batched-bench -m /tmp/peer/q4km.gguf -ngl 99 -fa on -c 43008 -b 2048 \
      -ub 512 -npp 512 -ntg 128 -npl 64 > "$OUTDIR/llama_batched.log" 2>&1
    echo "llama-batched-bench 64 x (512 in / 128 out), S_TG = decode tok/s:"; grep -E "^\|" "$OUTDIR/llama_batched.log" | tail -3
    [ "${PEER_OURS:-1}" = 1 ] && timeout ${PEER_TIMEOUT:-240} python3 scripts/bench_quant.py --formats ${PEER_FORMATS:-int4} --gguf /tmp/peer/q4km.gguf --runs 2 \
      > "$OUTDIR/bench_quant_peer.log" 2>&1
    python3 - "$OUTDIR" <<'PY'
import json, os, sys
out = sys.argv[1]
peer = [r for r in json.load(open(f"{out}/llama_bench.json")) if r.get("n_gen") == 128][0]["avg_ts"]
print(f"llama.cpp Q4_K_M tg128: {peer:.1f} tok/s")
for line in open(f"{out}/bench_quant_peer.log") if os.path.exists(f"{out}/bench_quant_peer.log") else []:
    if line.startswith("{") and "bs64_decode_tok_s" in line:
        r = json.loads(line)
        print(f"{r['label']}: bs1 {r['bs1_tok_s']:.1f} tok/s = {r['bs1_tok_s'] / peer:.2f}x llama.cpp, "
              f"{r['bs1_ratio']:.2f}x its floor; 64x decode {r['bs64_decode_tok_s']:.0f} tok/s")
PY
  else
    echo "llama.cpp not ready (see /tmp/peerbuild.log): no side-by-side figures"
  fi
fi
echo "== benchmarks"
python3 scripts/bench_headline.py "$MODE" 2>&1 | tee "$OUTDIR/bench.log"
