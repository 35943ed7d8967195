#!/usr/bin/env bash
# Set up .venv, then run the CPU test suite (GPU tests are marked `gpu` and skipped).
#   ./scripts/test.sh                 # everything but gpu
#   ./scripts/test.sh -k cli -x       # extra pytest arguments
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
setup_env
cd "$LOCALSGL_ROOT"
# models come from the packages and the local HF cache; never reach for the hub in tests
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
rc=0
"$LOCALSGL_VENV/bin/python" -m pytest -q -m "not gpu" tests "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
  echo "test.sh: FAILED: pytest collected no tests (exit 5)" >&2
  exit 1
fi
exit "$rc"
