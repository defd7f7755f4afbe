// Argument checks shared by the CPU and CUDA bindings of the tree ops.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include "ngram_pool_binding.h"
#include "tree.h"

namespace vllm_lookahead {

struct TreeAttentionDims {
  int64_t num_nodes, num_heads, num_kv_heads, head_size, block_size, words,
      batch, max_blocks;
};

inline TreeAttentionDims check_tree_attention_args(
    const at::Tensor& query, const at::Tensor& tree_key, const at::Tensor& tree_value,
    const at::Tensor& key_cache, const at::Tensor& value_cache,
    const at::Tensor& block_table, const at::Tensor& prefix_lens,
    const at::Tensor& cu_nodes, const at::Tensor& masks) {
  const auto dev = query.device();
  TORCH_CHECK_VALUE(query.dim() == 3 && tree_key.dim() == 3 && tree_value.dim() == 3,
                    "query, tree_key, tree_value must be [nodes, heads, head_size]");
  TORCH_CHECK_VALUE(key_cache.dim() == 4 && value_cache.dim() == 4,
                    "caches must be [num_blocks, block_size, kv_heads, head_size]");
  for (const auto* t : {&query, &tree_key, &tree_value, &key_cache, &value_cache}) {
    TORCH_CHECK_VALUE(t->scalar_type() == query.scalar_type() && t->is_contiguous() &&
                          t->device() == dev,
                      "query, tree keys/values and caches must share dtype and "
                      "device and be contiguous");
  }
  check_int_tensor(block_table, "block_table", at::kInt, 2, dev);
  check_int_tensor(prefix_lens, "prefix_lens", at::kInt, 1, dev);
  check_int_tensor(cu_nodes, "cu_nodes", at::kInt, 1, dev);
  check_int_tensor(masks, "masks", at::kLong, 2, dev);
  TreeAttentionDims d{query.size(0), query.size(1), tree_key.size(1), query.size(2),
                      key_cache.size(1), masks.size(1), prefix_lens.size(0),
                      block_table.size(1)};
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

}  // namespace vllm_lookahead
