# Sourced by scripts/demo.sh and scripts/test.sh: makes .venv with vLLM and
# the compiled ops on first use; afterwards only re-runs the steps whose
# inputs changed (requirements, or setup.py/csrc for the ops).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
cd "$ROOT"

log() { echo "[vllm-lookahead setup] $*" >&2; }

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  RUNTIME_REQS=requirements/cuda.txt
else
  RUNTIME_REQS=requirements/cpu.txt
fi

if [ ! -x "$PY" ]; then
  log "creating $VENV"
  python3 -m venv "$VENV"
  "$PY" -m pip install -q --upgrade pip
fi

fingerprint() { cat "$@" | sha256sum | cut -d' ' -f1; }

DEPS_STAMP="$VENV/.deps-stamp"
DEPS_HASH=$(fingerprint "$RUNTIME_REQS" requirements/dev.txt)
if [ "$(cat "$DEPS_STAMP" 2>/dev/null)" != "$DEPS_HASH" ]; then
  log "installing $RUNTIME_REQS and requirements/dev.txt (first run: several minutes)"
  "$PY" -m pip install -r "$RUNTIME_REQS" -r requirements/dev.txt
  # vLLM drags in PyPI's CUDA builds of these, which break `import
  # transformers` next to a CPU torch; nothing here needs them.
  if [ "$RUNTIME_REQS" = requirements/cpu.txt ]; then
    "$PY" -m pip uninstall -y -q torchvision torchaudio torchcodec || true
  fi
  echo "$DEPS_HASH" > "$DEPS_STAMP"
fi

OPS_STAMP="$VENV/.ops-stamp"
OPS_HASH=$(fingerprint setup.py pyproject.toml csrc/* "$DEPS_STAMP")
if [ "$(cat "$OPS_STAMP" 2>/dev/null)" != "$OPS_HASH" ] ||
   ! "$PY" -c "import vllm_lookahead._C" 2>/dev/null; then
  log "building the compiled ops (vllm_lookahead._C)"
  "$PY" -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | grep -v "^WARNING: Location" >&2 || true
  "$PY" -c "import vllm_lookahead._C" || { log "building the ops failed"; exit 1; }
  echo "$OPS_HASH" > "$OPS_STAMP"
fi
