// CUDA implementation of the n-gram pool ops. The pool logic is the one in
// ngram_pool.h; here each request row is one thread. Per-request slots are
// distinct within a call (the Python wrapper guarantees it), so row threads
// never touch the same bucket; the shared slot is updated afterwards by a
// single thread in row order, which keeps the result identical to the CPU op.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "ngram_pool_binding.h"

namespace vllm_lookahead {
namespace {

constexpr int kThreads = 128;

__global__ void insert_rows_kernel(PoolView p, const int32_t* slots,
                                   const int32_t* tokens, int64_t width,
                                   const int32_t* rows, const int32_t* starts,
                                   const int32_t* ends, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  insert_span(p, slots[i], tokens + static_cast<int64_t>(rows[i]) * width,
              starts[i], ends[i]);
}

__global__ void insert_shared_kernel(PoolView p, int shared_slot,
                                     const int32_t* slots, const int32_t* tokens,
                                     int64_t width, const int32_t* rows,
                                     const int32_t* starts, const int32_t* ends,
                                     int n) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  for (int i = 0; i < n; ++i) {
    if (slots[i] == shared_slot) continue;
    insert_span(p, shared_slot, tokens + static_cast<int64_t>(rows[i]) * width,
                starts[i], ends[i]);
  }
}

__global__ void lookup_kernel(PoolView p, const int32_t* slots,
                              const int32_t* query, int shared_slot,
                              int max_guesses, int32_t* out, int32_t* counts,
                              int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  counts[i] = lookup_key(p, slots[i], shared_slot, query + i * p.key_len,
                         max_guesses,
                         out + static_cast<int64_t>(i) * max_guesses * p.cont_len);
}

int num_blocks(int64_t n) { return static_cast<int>((n + kThreads - 1) / kThreads); }

void ngram_pool_insert_cuda(at::Tensor& keys, at::Tensor& entries, at::Tensor& sizes,
                            at::Tensor& stamps, at::Tensor& clock, int64_t ways,
                            const at::Tensor& slots, const at::Tensor& tokens,
                            const at::Tensor& rows, const at::Tensor& starts,
                            const at::Tensor& ends, int64_t vocab_size,
                            int64_t shared_slot) {
  (void)vocab_size;  // validated by the Python wrapper, no device sync here
  const PoolView p = make_pool_view(keys, entries, sizes, stamps, clock, ways);
  check_insert_args(keys, slots, tokens, rows, starts, ends, shared_slot);
  const int64_t n = slots.size(0);
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(keys.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  insert_rows_kernel<<<num_blocks(n), kThreads, 0, stream>>>(
      p, slots.data_ptr<int32_t>(), tokens.data_ptr<int32_t>(), tokens.size(1),
      rows.data_ptr<int32_t>(), starts.data_ptr<int32_t>(), ends.data_ptr<int32_t>(),
      static_cast<int>(n));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (shared_slot >= 0) {
    insert_shared_kernel<<<1, 1, 0, stream>>>(
        p, static_cast<int>(shared_slot), slots.data_ptr<int32_t>(),
        tokens.data_ptr<int32_t>(), tokens.size(1), rows.data_ptr<int32_t>(),
        starts.data_ptr<int32_t>(), ends.data_ptr<int32_t>(), static_cast<int>(n));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

std::tuple<at::Tensor, at::Tensor> ngram_pool_lookup_cuda(
    at::Tensor keys, at::Tensor entries, at::Tensor sizes, at::Tensor stamps,
    at::Tensor clock, int64_t ways, const at::Tensor& slots,
    const at::Tensor& query, int64_t max_guesses, int64_t shared_slot) {
  const PoolView p = make_pool_view(keys, entries, sizes, stamps, clock, ways);
  auto [out, counts] = prepare_lookup(keys, p, slots, query, max_guesses, shared_slot);
  const int64_t n = slots.size(0);
  if (n == 0) return {out, counts};
  const c10::cuda::CUDAGuard guard(keys.device());
  lookup_kernel<<<num_blocks(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      p, slots.data_ptr<int32_t>(), query.data_ptr<int32_t>(),
      static_cast<int>(shared_slot), static_cast<int>(max_guesses),
      out.data_ptr<int32_t>(), counts.data_ptr<int32_t>(), static_cast<int>(n));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(vllm_lookahead, CUDA, m) {
  m.impl("ngram_pool_insert", &ngram_pool_insert_cuda);
  m.impl("ngram_pool_lookup", &ngram_pool_lookup_cuda);
}

}  // namespace vllm_lookahead
