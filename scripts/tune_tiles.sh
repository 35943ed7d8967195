#!/usr/bin/env bash
# A tuned-tiles file for the GPU this runs on (kernels/tuned/<GPU name>.json): the batch-1 GEMVs'
# tiles, the 16/64-row GEMM tiles, then the 2-8-row (quant_rows) and 16/64-row int8-activation
# (quant_a8) routes, each probe building on the file the one before wrote; then int4 end to end with
# the file as it was and with the new one.  The new file is left in kernels/tuned/ and copied to $OUT
# (or /tmp/localsgl-tune).
#
#   bash scripts/tune_tiles.sh            # on the device machine: bash scripts/device_check.sh none notests tune
#
# On an H100 the whole run takes ~12 minutes (GEMVs ~2.5, GEMM ~4.5, rows ~2.5, a8 ~0.5, timing ~2.5):
# past one device call, so there it runs in parts (TUNE_ROUTES, TUNE_GEMV_FORMATS="", TUNE_BENCH=0, then
# TUNE_BASE naming the file as it was for the timing; bench/RESULTS.md, "twenty-seventh session").
#
# env: TUNE_GEMV_FORMATS (default int4g128 int4g32 int8g16 int8; fp8's batch 1 runs the dense GEMVs; "": no
#      GEMV probe, the file's GEMV entries kept), TUNE_ROUTES (default "gemm rows a8"; "" for the GEMVs alone),
#      TUNE_GEMM_FORMATS (the gemm route's, default int4g128 int4g32 int8g16: int4 and a Q4_K_M file's parts),
#      TUNE_BENCH=0 (no end-to-end timing), TUNE_BASE (the file the new one is timed against; default this
#      GPU's file as found), TUNE_TIMEOUT s per probe (default 200; a probe it stops leaves the shapes it
#      finished, and those are taken), TUNE_GGUF (a GGUF file, e.g.
#      /tmp/peer/q4km.gguf of the peer step, or a path where a random Q4_K_M-layout one is written: timed kept
#      quantized before and after too).  Needs PYTHONPATH as device_check.sh sets it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR="${OUT:-/tmp/localsgl-tune}"; mkdir -p "$OUTDIR"
gpu="$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")" || exit 1
tuned="kernels/tuned/$gpu.json"
if [ -n "${TUNE_BASE:-}" ]; then cp "$TUNE_BASE" "$OUTDIR/before.json" || exit 1
elif [ -f "$tuned" ]; then cp "$tuned" "$OUTDIR/before.json"; else echo "[]" > "$OUTDIR/before.json"; fi
echo "[]" > "$OUTDIR/empty.json"
gguf_pid=""  # TUNE_GGUF not there yet: a random Q4_K_M-layout file, written on the CPU while the probes run
if [ -n "${TUNE_GGUF:-}" ] && [ ! -f "$TUNE_GGUF" ] && [ "${TUNE_BENCH:-1}" != 0 ]; then
  python3 scripts/random_q4km_gguf.py "$TUNE_GGUF" > "$OUTDIR/random_gguf.log" 2>&1 & gguf_pid=$!
fi
t0=$(date +%s)
elapsed() { echo "$(( $(date +%s) - t0 )) s"; }
# whether the probe just run ($rc) left entries to take: all of them, or, stopped by its time limit
# (rc 124), those of the shapes it finished (the probes write their files after every shape, each
# through <file>.tmp<pid> and a rename; a probe stopped between the two leaves that temporary behind)
finished() {
  rm -f "$OUTDIR"/*.json.tmp[0-9]*
  [ "$rc" = 0 ] && return 0
  local f="${2:-$OUTDIR/$1_rows.json}"
  if [ "$rc" = 124 ] && [ -s "$f" ]; then echo "$1: stopped by TUNE_TIMEOUT; the shapes it finished are taken"; return 0; fi
  return 1
}

gemv_formats="${TUNE_GEMV_FORMATS-int4g128 int4g32 int8g16 int8}"
if [ -n "$gemv_formats" ]; then
  echo "== $gpu: batch-1 GEMV tiles against the built-in ones ($gemv_formats)"
  rm -f "$OUTDIR/gemv_rows.json" "$OUTDIR/gemv_tiles.json"
  LOCALSGL_QUANT_TILES="$OUTDIR/empty.json" timeout ${TUNE_TIMEOUT:-200} python3 scripts/probe_quant_tiles.py \
    --formats $gemv_formats --kinds gemv --words 3 --jobs 16 \
    --json "$OUTDIR/gemv_rows.json" --tiles "$OUTDIR/gemv_tiles.json" > "$OUTDIR/gemv_probe.log" 2>&1
  rc=$?; echo "rc $rc at $(elapsed)"
  grep -E "^int.* gemv " "$OUTDIR/gemv_probe.log"
  finished "gemv" && python3 scripts/merge_tiles.py "$OUTDIR/before.json" "$OUTDIR/gemv_rows.json" \
    "$OUTDIR/gemv_tiles.json" -o "$tuned"
fi
for route in ${TUNE_ROUTES-gemm rows a8}; do
  if [ "$route" = gemm ]; then
    # swept from the built-in tiles, as the GEMVs; a shape whose built-in tile wins gets that tile
    echo "== 16/64-row GEMM tiles against the built-in ones (${TUNE_GEMM_FORMATS:-int4g128 int4g32 int8g16})"
    rm -f "$OUTDIR/gemm_rows.json" "$OUTDIR/gemm_tiles.json"
    LOCALSGL_QUANT_TILES="$OUTDIR/empty.json" timeout ${TUNE_TIMEOUT:-200} python3 scripts/probe_quant_tiles.py \
      --formats ${TUNE_GEMM_FORMATS:-int4g128 int4g32 int8g16} --kinds gemm --jobs 16 \
      --json "$OUTDIR/gemm_rows.json" --tiles "$OUTDIR/gemm_tiles.json" > "$OUTDIR/gemm_probe.log" 2>&1
    rc=$?; echo "rc $rc at $(elapsed)"
    grep -E "^int.* gemm " "$OUTDIR/gemm_probe.log"
    if finished "gemm"; then
      [ -f "$tuned" ] || echo "[]" > "$tuned"
      python3 scripts/merge_tiles.py "$tuned" "$OUTDIR/gemm_rows.json" "$OUTDIR/gemm_tiles.json" -o "$tuned"
    fi
    continue
  fi
  echo "== the $route route against the GEMM"
  # the probe times against this GPU's tuned file (the one just written) and writes it back with its entries
  rm -f "$OUTDIR/${route}_tiles.json"
  timeout ${TUNE_TIMEOUT:-200} python3 "scripts/probe_quant_$route.py" --out "$OUTDIR/${route}_tiles.json" \
    > "$OUTDIR/${route}_probe.log" 2>&1
  rc=$?; echo "rc $rc at $(elapsed)"
  grep -vE "Warning|warn_once" "$OUTDIR/${route}_probe.log" | tail -16
  finished "$route" "$OUTDIR/${route}_tiles.json" && cp "$OUTDIR/${route}_tiles.json" "$tuned"
done
[ -f "$tuned" ] && cp "$tuned" "$OUTDIR/$gpu.json" && echo "-> $tuned ($(python3 -c "import json,sys; print(len(json.load(open(sys.argv[1]))))" "$tuned") entries), copied to $OUTDIR/$gpu.json"

if [ "${TUNE_BENCH:-1}" != 0 ] && [ -f "$tuned" ]; then
  echo "== int4 (Llama-3.1-8B, random weights) with the file before and after, alternated"
  for f in before "$gpu" before "$gpu"; do
    LOCALSGL_QUANT_TILES="$OUTDIR/$f.json" timeout 120 python3 scripts/bench_quant.py --runs 3 --formats int4 2>&1 \
      | grep "^int4" | sed "s|^int4 *|$f |"
  done
  [ -n "$gguf_pid" ] && wait "$gguf_pid"
  if [ -n "${TUNE_GGUF:-}" ] && [ -f "$TUNE_GGUF" ]; then
    for f in before "$gpu"; do
      LOCALSGL_QUANT_TILES="$OUTDIR/$f.json" timeout 150 python3 scripts/bench_quant.py --runs 3 --formats --gguf "$TUNE_GGUF" \
        2>&1 | grep "^$TUNE_GGUF" | sed "s|^$TUNE_GGUF *|$f gguf |"
    done
  fi
  for f in before "$gpu"; do
    echo "-- bench latency, int4, batch 2 / 4 / 8, tiles $f"
    LOCALSGL_QUANT_TILES="$OUTDIR/$f.json" timeout 150 python3 -c "
from localsgl import bench
bench.main('latency', dict(model='llama-3.1-8b', load_format='dummy', quantization='int4'),
           ['--batch', '2', '4', '8', '--input-len', '512', '--output-len', '128', '--runs', '2'])" 2>&1 | grep -E "^decode|Error"
  done
fi
echo "tune done at $(elapsed)"
