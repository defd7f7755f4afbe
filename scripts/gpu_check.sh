#!/usr/bin/env bash
# One check for a lent GPU machine (torch with CUDA, nvcc, no vLLM needed):
# builds the ops with their CUDA kernels in place, runs the CUDA tests
# against the CPU references (tree attention on the LBNHC layout in fp32 and
# bf16 included) and the tree-op microbenchmark (op vs torch SDPA), and
# writes everything to ${OUT:-gpu-check}/results.md.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
{
  echo "# GPU check $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} | tee "$OUT/results.md"
VLLM_LOOKAHEAD_CUDA=1 "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1 \
  || { tail -30 "$OUT/build.log"; exit 1; }
echo '## tests' >> "$OUT/results.md"
"$PY" -m pytest -q -rs -p no:cacheprovider tests/test_ops_cuda.py tests/test_tree_ops.py \
  tests/test_fake_kernels.py 2>&1 | tee -a "$OUT/results.md" | tail -5
echo '## tree ops microbenchmark (cuda)' >> "$OUT/results.md"
"$PY" benchmarks/bench_tree_ops.py --device cuda 2>&1 | tee -a "$OUT/results.md"
