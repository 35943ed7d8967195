#!/usr/bin/env bash
# Puts into .whl/ the wheels that the device machine's image lacks (x86-64, Python 3.12); the
# folder travels with a device run, and scripts/device_check.sh installs what it holds there.
#   llguidance   structured decoding (the version of this checkout's environment)
#   llama-models only for its Llama 3 tokenizer file (llama3/tokenizer.model, 128,256 tokens),
#                which scripts/bench_structured.py reads without importing the package
#   gguf         GGUF files kept quantized (scripts/bench_quant.py --gguf)
#   py-spy       the start-up profile of scripts/device_check.sh's startup step
#   fastapi, uvicorn and their needs   `bench serving` and the server tests (httptools and uvloop
#                as pip installs them for users: the streaming path is measured as it runs for them)
# Usage: bash scripts/device_wheels.sh   (needs PyPI; .whl/ is git-ignored)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python; [ -x "$PY" ] || PY=python3
LLG=$("$PY" -c "import importlib.metadata as m; print(m.version('llguidance'))")
ver() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
WANT=("llguidance==$LLG" "llama-models==0.3.0" "py-spy==0.4.3")
for p in gguf fastapi uvicorn httptools uvloop starlette pydantic pydantic-core annotated-types annotated-doc typing-inspection \
         typing-extensions opentelemetry-api; do
  WANT+=("$p==$(ver $p)")
done
mkdir -p .whl
# one version of each package: two make the device's install fail
for spec in "${WANT[@]}"; do
  name=${spec%%==*}; file=${name//-/_}; version=${spec##*==}
  for w in .whl/"$file"-*.whl; do
    [ -e "$w" ] && [[ "$w" != .whl/"$file-$version"-* ]] && rm -v "$w"
  done
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl "${WANT[@]}"
ls -l .whl
