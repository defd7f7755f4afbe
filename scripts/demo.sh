#!/usr/bin/env bash
# The main job: lookahead decoding next to plain vLLM on Spec-Bench prompts.
# Extra arguments go to benchmarks/demo.py (see --help).
source "$(dirname "$0")/env.sh"
exec "$PY" benchmarks/demo.py "$@"
