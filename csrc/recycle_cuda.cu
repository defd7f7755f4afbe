// CUDA implementation of the token-recycling ops (semantics in recycle.h).
// recycle_update: one thread per (row, rank); a row whose token appears again
// later in the call does not write, so the last row wins as on the CPU.
// recycle_tree: one thread per request walks the template (T is small); the
// template's order is checked on the host copy.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "recycle_binding.h"

namespace vllm_lookahead {
namespace {

constexpr int kThreads = 128;

__global__ void recycle_update_kernel(int32_t* table, int64_t vocab, int64_t k,
                                      const int32_t* tokens, const int32_t* topk,
                                      int64_t width, int64_t n) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= n * k) return;
  const int64_t i = idx / k, r = idx % k;
  const int32_t token = tokens[i];
  if (token < 0 || token >= vocab) return;
  for (int64_t j = i + 1; j < n; ++j) {
    if (tokens[j] == token) return;
  }
  table[static_cast<int64_t>(token) * k + r] = topk[i * width + r];
}

__global__ void recycle_tree_kernel(const int32_t* table, int64_t vocab, int64_t k,
                                    const int32_t* roots, const int32_t* parents,
                                    const int32_t* ranks, int64_t nodes, int32_t* out,
                                    int64_t batch) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  recycle_walk(table, vocab, k, roots[b], parents, ranks, nodes, out + b * nodes);
}

int num_blocks(int64_t n) { return static_cast<int>((n + kThreads - 1) / kThreads); }

void recycle_update_cuda(at::Tensor& table, const at::Tensor& tokens, const at::Tensor& topk) {
  check_recycle_update(table, tokens, topk);
  const int64_t n = tokens.size(0), k = table.size(1);
  if (n == 0 || k == 0) return;
  const c10::cuda::CUDAGuard guard(table.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  // Out-of-vocabulary tokens are skipped on the device (no host sync); the
  // Python wrapper checks them.
  recycle_update_kernel<<<num_blocks(n * k), kThreads, 0, stream>>>(
      table.data_ptr<int32_t>(), table.size(0), k, tokens.data_ptr<int32_t>(),
      topk.data_ptr<int32_t>(), topk.size(1), n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor recycle_tree_cuda(const at::Tensor& table, const at::Tensor& roots,
                             const at::Tensor& parents, const at::Tensor& ranks) {
  check_recycle_tree(table, roots, parents, ranks);
  check_template_order(parents.cpu(), "recycle_tree");
  const int64_t batch = roots.size(0), nodes = parents.size(0);
  auto out = at::full({batch, nodes}, -1, roots.options());
  if (batch == 0 || nodes == 0) return out;
  const c10::cuda::CUDAGuard guard(table.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  recycle_tree_kernel<<<num_blocks(batch), kThreads, 0, stream>>>(
      table.data_ptr<int32_t>(), table.size(0), table.size(1), roots.data_ptr<int32_t>(),
      parents.data_ptr<int32_t>(), ranks.data_ptr<int32_t>(), nodes,
      out.data_ptr<int32_t>(), batch);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(vllm_lookahead, CUDA, m) {
  m.impl("recycle_update", &recycle_update_cuda);
  m.impl("recycle_tree", &recycle_tree_cuda);
}

}  // namespace vllm_lookahead
