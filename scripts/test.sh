#!/usr/bin/env bash
# The whole test suite, slow end-to-end tests included. Extra arguments go to
# pytest (e.g. -m "not slow" for the quick ones).
source "$(dirname "$0")/env.sh"
PYTHON="$PY" bash scripts/check_cuda_compile.sh
exec "$PY" -m pytest -v -rs --durations=40 tests "$@"
