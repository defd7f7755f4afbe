#!/usr/bin/env bash
# End-to-end benchmark (benchmarks/benchmark.py): every method next to plain
# vLLM on Spec-Bench (and HumanEval) prompts; --quick for a run of minutes.
# Extra arguments go to the benchmark (see --help).
source "$(dirname "$0")/env.sh"
exec "$PY" benchmarks/benchmark.py "$@"
