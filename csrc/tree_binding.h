// Argument checks shared by the CPU and CUDA bindings of the tree ops.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "ngram_pool_binding.h"
#include "tree.h"

namespace vllm_lookahead {

struct TreeAttentionDims {
  int64_t num_nodes, num_heads, num_kv_heads, head_size, block_size, words,
      batch, max_blocks;
  // Element strides of the caches' [block, slot, kv head] dims: any paged
  // layout viewed as [num_blocks, block_size, kv_heads, head_size] works
  // (vLLM's CPU backend stores blocks head-major).
  int64_t cache_strides[3];
};

// Caches: same dtype and device as the query, any strides (the CUDA kernel
// additionally needs a contiguous head dim).
inline void check_cache_view(const at::Tensor& cache, const at::Tensor& like,
                             const char* name) {
  TORCH_CHECK_VALUE(cache.dim() == 4, name,
                    " must be a [num_blocks, block_size, kv_heads, head_size] view");
  TORCH_CHECK_VALUE(cache.scalar_type() == like.scalar_type() &&
                        cache.device() == like.device(),
                    name, " must match the query's dtype and device");
}

inline TreeAttentionDims check_tree_attention_args(
    const at::Tensor& query, const at::Tensor& tree_key, const at::Tensor& tree_value,
    const at::Tensor& key_cache, const at::Tensor& value_cache,
    const at::Tensor& block_table, const at::Tensor& prefix_lens,
    const at::Tensor& cu_nodes, const at::Tensor& masks) {
  const auto dev = query.device();
  TORCH_CHECK_VALUE(query.dim() == 3 && tree_key.dim() == 3 && tree_value.dim() == 3,
                    "query, tree_key, tree_value must be [nodes, heads, head_size]");
  check_cache_view(key_cache, query, "key_cache");
  check_cache_view(value_cache, query, "value_cache");
  for (const auto* t : {&query, &tree_key, &tree_value}) {
    TORCH_CHECK_VALUE(t->scalar_type() == query.scalar_type() && t->is_contiguous() &&
                          t->device() == dev,
                      "query, tree_key and tree_value must share dtype and "
                      "device and be contiguous");
  }
  check_int_tensor(block_table, "block_table", at::kInt, 2, dev);
  check_int_tensor(prefix_lens, "prefix_lens", at::kInt, 1, dev);
  check_int_tensor(cu_nodes, "cu_nodes", at::kInt, 1, dev);
  check_int_tensor(masks, "masks", at::kLong, 2, dev);
  TreeAttentionDims d{query.size(0), query.size(1), tree_key.size(1), query.size(2),
                      key_cache.size(1), masks.size(1), prefix_lens.size(0),
                      block_table.size(1),
                      {key_cache.stride(0), key_cache.stride(1), key_cache.stride(2)}};
  TORCH_CHECK_VALUE(tree_key.size(0) == d.num_nodes && tree_value.sizes() == tree_key.sizes() &&
                        tree_key.size(2) == d.head_size,
                    "tree_key/tree_value must be [nodes, kv_heads, head_size]");
  TORCH_CHECK_VALUE(d.num_kv_heads >= 1 && d.num_heads % d.num_kv_heads == 0,
                    "query heads must be a multiple of kv heads");
  TORCH_CHECK_VALUE(key_cache.sizes() == value_cache.sizes() &&
                        key_cache.size(2) == d.num_kv_heads &&
                        key_cache.size(3) == d.head_size,
                    "caches must be [num_blocks, block_size, kv_heads, head_size]");
  TORCH_CHECK_VALUE(cu_nodes.size(0) == d.batch + 1 && block_table.size(0) == d.batch,
                    "cu_nodes must be [batch + 1] and block_table [batch, max_blocks]");
  TORCH_CHECK_VALUE(masks.size(0) == d.num_nodes, "masks must be [nodes, words]");
  return d;
}

// Compaction: caches are [num_blocks, block_size, ...] views of one dtype
// per list; slots are int64 flat ids block * block_size + offset, in range.
inline void check_compact_args(at::TensorList key_caches, at::TensorList value_caches,
                               const at::Tensor& src_slots, const at::Tensor& dst_slots) {
  TORCH_CHECK_VALUE(key_caches.size() == value_caches.size(),
                    "need as many value caches as key caches");
  check_int_tensor(src_slots, "src_slots", at::kLong, 1, src_slots.device());
  check_int_tensor(dst_slots, "dst_slots", at::kLong, 1, src_slots.device());
  TORCH_CHECK_VALUE(src_slots.size(0) == dst_slots.size(0),
                    "src_slots and dst_slots must have the same length");
  int64_t min_slots = std::numeric_limits<int64_t>::max();
  for (const at::TensorList caches : {key_caches, value_caches}) {
    for (const at::Tensor& cache : caches) {
      TORCH_CHECK_VALUE(cache.dim() == 4 && cache.device() == src_slots.device(),
                        "caches must be [num_blocks, block_size, kv_heads, head_size] "
                        "views on the slots' device");
      min_slots = std::min(min_slots, cache.size(0) * cache.size(1));
    }
  }
  // Range check on the host only: on CUDA it would cost a device sync.
  if (src_slots.device().is_cpu() && src_slots.numel() > 0) {
    const auto both = at::cat({src_slots, dst_slots});
    TORCH_CHECK_VALUE(both.min().item<int64_t>() >= 0 &&
                          both.max().item<int64_t>() < min_slots,
                      "slot out of range of a cache with ", min_slots, " slots");
  }
}

}  // namespace vllm_lookahead
