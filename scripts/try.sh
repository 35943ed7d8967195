#!/usr/bin/env bash
# Try localsgl: set up .venv once (quiet afterwards), then `localsgl run "$@"`.
#   ./scripts/try.sh "What is the capital of France?"
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
setup_env
exec "$LOCALSGL_VENV/bin/localsgl" run "$@"
