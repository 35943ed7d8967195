#!/usr/bin/env bash
# Set up .venv, then run the CPU test suite (GPU tests are marked `gpu` and skipped) in both
# engine modes: the whole suite with every engine core on a thread of its front end
# (LOCALSGL_IN_PROCESS=1), then the tests that build engines (marked `engine`,
# tests/conftest.py) again with every core in its own process (LOCALSGL_IN_PROCESS=0).
#   ./scripts/test.sh                 # everything but gpu, both modes
#   ./scripts/test.sh -k cli -x       # extra pytest arguments (both passes)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
setup_env
cd "$LOCALSGL_ROOT"
# models come from the packages and the local HF cache; never reach for the hub in tests
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
run_pass() {  # run_pass MODE MARKERS [pytest arguments]: pytest's exit code, 5 (nothing collected) as is
  local mode="$1" markers="$2"
  shift 2
  LOCALSGL_IN_PROCESS="$mode" "$LOCALSGL_VENV/bin/python" -m pytest -q -m "$markers" tests "$@"
}
rc=0
run_pass 1 "not gpu" "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
  echo "test.sh: FAILED: pytest collected no tests (exit 5)" >&2
  exit 1
fi
echo "test.sh: the engine tests again, each engine core in its own process (LOCALSGL_IN_PROCESS=0)" >&2
rc2=0
run_pass 0 "engine and not in_process_only and not gpu" "$@" || rc2=$?
if [ "$rc2" -ne 0 ] && [ "$rc2" -ne 5 ] && [ "$rc" -eq 0 ]; then  # 5: extra arguments left no engine test
  rc=$rc2
fi
exit "$rc"
