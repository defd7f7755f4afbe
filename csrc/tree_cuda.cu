// CUDA implementation of the tree ops: tree attention with one warp per
// (node, query head), ancestor masks with one thread per request, KV
// compaction as a gather into a staging buffer then a scatter.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "tree_binding.h"

namespace vllm_lookahead {
namespace {

constexpr int kWarp = 32;
constexpr int kMaxHeadSize = 256;
constexpr int kPerLane = kMaxHeadSize / kWarp;

__device__ float warp_sum(float v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

template <typename T>
__device__ void attend(const T* qv, const T* k, const T* v, int D, float scale,
                       OnlineSoftmax& sm, float* acc) {
  float partial = 0.f;
  for (int i = threadIdx.x; i < D; i += kWarp) {
    partial += static_cast<float>(qv[i]) * static_cast<float>(k[i]);
  }
  float rescale, weight;
  sm.add(warp_sum(partial) * scale, rescale, weight);
  for (int r = 0, i = threadIdx.x; i < D; ++r, i += kWarp) {
    acc[r] = acc[r] * rescale + weight * static_cast<float>(v[i]);
  }
}

template <typename T>
__global__ void tree_attention_kernel(TreeAttentionDims d, const T* q, const T* tk,
                                      const T* tv, const T* kc, const T* vc,
                                      const int32_t* bt, const int32_t* prefix,
                                      const int32_t* cu, const int64_t* masks,
                                      float scale, T* out) {
  const int64_t node = blockIdx.x, h = blockIdx.y;
  const int64_t kvh = h / (d.num_heads / d.num_kv_heads);
  const int D = static_cast<int>(d.head_size);
  int64_t b = 0;
  while (cu[b + 1] <= node) ++b;
  const T* qv = q + (node * d.num_heads + h) * D;
  float acc[kPerLane] = {};
  OnlineSoftmax sm;
  for (int32_t j = 0; j < prefix[b]; ++j) {
    const int64_t block = bt[b * d.max_blocks + j / d.block_size];
    const int64_t off = block * d.cache_strides[0] + (j % d.block_size) * d.cache_strides[1] +
                        kvh * d.cache_strides[2];
    attend(qv, kc + off, vc + off, D, scale, sm, acc);
  }
  const int64_t* mask = masks + node * d.words;
  for (int32_t m = cu[b]; m <= node; ++m) {
    if (!mask_has(mask, m - cu[b])) continue;
    const int64_t off = (static_cast<int64_t>(m) * d.num_kv_heads + kvh) * D;
    attend(qv, tk + off, tv + off, D, scale, sm, acc);
  }
  T* o = out + (node * d.num_heads + h) * D;
  for (int r = 0, i = threadIdx.x; i < D; ++r, i += kWarp) {
    o[i] = static_cast<T>(acc[r] / sm.denom);
  }
}

__global__ void ancestor_masks_kernel(const int32_t* parents, const int32_t* cu,
                                      int64_t batch, int words, int64_t* masks) {
  const int64_t b = blockIdx.x * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  build_ancestor_masks(parents + cu[b], cu[b + 1] - cu[b], words,
                       masks + static_cast<int64_t>(cu[b]) * words);
}

// Copies [n, kv_heads, head_size] rows between a strided paged cache and a
// contiguous staging buffer; one block per slot.
template <typename T, bool kToCache>
__global__ void stage_slots_kernel(T* cache, int64_t s0, int64_t s1, int64_t s2,
                                   int64_t s3, int64_t block_size, int64_t heads,
                                   int64_t head_size, const int64_t* slots, T* staged) {
  const int64_t i = blockIdx.x, slot = slots[i];
  T* base = cache + (slot / block_size) * s0 + (slot % block_size) * s1;
  for (int64_t k = threadIdx.x; k < heads * head_size; k += blockDim.x) {
    T* c = base + (k / head_size) * s2 + (k % head_size) * s3;
    T* st = staged + i * heads * head_size + k;
    if (kToCache) {
      *c = *st;
    } else {
      *st = *c;
    }
  }
}

at::Tensor tree_ancestor_masks_cuda(const at::Tensor& parents, const at::Tensor& cu_nodes,
                                    int64_t words) {
  check_int_tensor(parents, "parents", at::kInt, 1, parents.device());
  check_int_tensor(cu_nodes, "cu_nodes", at::kInt, 1, parents.device());
  TORCH_CHECK_VALUE(words >= 1, "words must be >= 1");
  const c10::cuda::CUDAGuard guard(parents.device());
  auto masks = at::zeros({parents.size(0), words}, parents.options().dtype(at::kLong));
  const int64_t batch = cu_nodes.size(0) - 1;
  if (batch > 0) {
    ancestor_masks_kernel<<<(batch + 127) / 128, 128, 0, c10::cuda::getCurrentCUDAStream()>>>(
        parents.data_ptr<int32_t>(), cu_nodes.data_ptr<int32_t>(), batch,
        static_cast<int>(words), masks.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return masks;
}

at::Tensor tree_attention_cuda(const at::Tensor& query, const at::Tensor& tree_key,
                               const at::Tensor& tree_value, const at::Tensor& key_cache,
                               const at::Tensor& value_cache, const at::Tensor& block_table,
                               const at::Tensor& prefix_lens, const at::Tensor& cu_nodes,
                               const at::Tensor& masks, double scale) {
  const auto d = check_tree_attention_args(query, tree_key, tree_value, key_cache,
                                           value_cache, block_table, prefix_lens,
                                           cu_nodes, masks);
  TORCH_CHECK_VALUE(d.head_size <= kMaxHeadSize, "head_size must be <= ", kMaxHeadSize);
  TORCH_CHECK_VALUE(key_cache.stride(3) == 1 && key_cache.strides() == value_cache.strides(),
                    "the CUDA kernel needs caches with a contiguous head dim, "
                    "keys and values strided alike");
  auto out = at::empty_like(query);
  if (d.num_nodes == 0) return out;
  const c10::cuda::CUDAGuard guard(query.device());
  const dim3 grid(static_cast<unsigned>(d.num_nodes), static_cast<unsigned>(d.num_heads));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, query.scalar_type(), "tree_attention_cuda", [&] {
        tree_attention_kernel<scalar_t><<<grid, kWarp, 0, c10::cuda::getCurrentCUDAStream()>>>(
            d, query.data_ptr<scalar_t>(), tree_key.data_ptr<scalar_t>(),
            tree_value.data_ptr<scalar_t>(), key_cache.data_ptr<scalar_t>(),
            value_cache.data_ptr<scalar_t>(), block_table.data_ptr<int32_t>(),
            prefix_lens.data_ptr<int32_t>(), cu_nodes.data_ptr<int32_t>(),
            masks.data_ptr<int64_t>(), static_cast<float>(scale),
            out.data_ptr<scalar_t>());
      });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

void tree_kv_compact_cuda(at::TensorList key_caches, at::TensorList value_caches,
                          const at::Tensor& src_slots, const at::Tensor& dst_slots) {
  check_compact_args(key_caches, value_caches, src_slots, dst_slots);
  const int64_t n = src_slots.size(0);
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(src_slots.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (const at::TensorList caches : {key_caches, value_caches}) {
    for (const at::Tensor& cache : caches) {
      auto staged = at::empty({n, cache.size(2), cache.size(3)}, cache.options());
      AT_DISPATCH_ALL_TYPES_AND3(at::kHalf, at::kBFloat16, at::kBool, cache.scalar_type(),
                                 "tree_kv_compact_cuda", [&] {
        auto* base = cache.data_ptr<scalar_t>();
        const auto st = cache.strides();
        stage_slots_kernel<scalar_t, false><<<n, 128, 0, stream>>>(
            base, st[0], st[1], st[2], st[3], cache.size(1), cache.size(2), cache.size(3),
            src_slots.data_ptr<int64_t>(), staged.data_ptr<scalar_t>());
        stage_slots_kernel<scalar_t, true><<<n, 128, 0, stream>>>(
            base, st[0], st[1], st[2], st[3], cache.size(1), cache.size(2), cache.size(3),
            dst_slots.data_ptr<int64_t>(), staged.data_ptr<scalar_t>());
      });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(vllm_lookahead, CUDA, m) {
  m.impl("tree_ancestor_masks", &tree_ancestor_masks_cuda);
  m.impl("tree_attention", &tree_attention_cuda);
  m.impl("tree_kv_compact", &tree_kv_compact_cuda);
}

}  // namespace vllm_lookahead
