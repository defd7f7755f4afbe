// Argument checks shared by the CPU and CUDA bindings of the recycling ops.
#pragma once

#include "ngram_pool_binding.h"
#include "recycle.h"

namespace vllm_lookahead {

inline void check_recycle_update(const at::Tensor& table, const at::Tensor& tokens,
                                 const at::Tensor& topk) {
  const auto dev = table.device();
  check_int_tensor(table, "table", at::kInt, 2, dev);
  check_int_tensor(tokens, "tokens", at::kInt, 1, dev);
  check_int_tensor(topk, "topk", at::kInt, 2, dev);
  TORCH_CHECK_VALUE(topk.size(0) == tokens.size(0),
                    "recycle_update: topk must have one row per token, got ",
                    topk.size(0), " rows for ", tokens.size(0), " tokens");
  TORCH_CHECK_VALUE(topk.size(1) >= table.size(1),
                    "recycle_update: topk has ", topk.size(1), " ranks, the table ",
                    table.size(1));
}

inline void check_recycle_tree(const at::Tensor& table, const at::Tensor& roots,
                               const at::Tensor& parents, const at::Tensor& ranks) {
  const auto dev = table.device();
  check_int_tensor(table, "table", at::kInt, 2, dev);
  check_int_tensor(roots, "roots", at::kInt, 1, dev);
  check_int_tensor(parents, "parents", at::kInt, 1, dev);
  check_int_tensor(ranks, "ranks", at::kInt, 1, dev);
  TORCH_CHECK_VALUE(parents.size(0) == ranks.size(0),
                    "recycle_tree: parents and ranks must have the same length");
}

// Parents before children, on the host (the template is small and lives on
// the CPU for the CUDA op too); op names the caller in the error.
inline void check_template_order(const at::Tensor& parents_cpu, const char* op) {
  const int32_t* p = parents_cpu.data_ptr<int32_t>();
  for (int64_t j = 0; j < parents_cpu.size(0); ++j) {
    TORCH_CHECK_VALUE(p[j] >= -1 && p[j] < j, op, ": parent ", p[j], " of node ", j,
                      " must be -1 or an earlier node");
  }
}

}  // namespace vllm_lookahead
