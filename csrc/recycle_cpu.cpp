// CPU implementation of the token-recycling ops (semantics in recycle.h;
// reference: vllm_lookahead.reference.recycle_update / recycle_tree).
#include "recycle_binding.h"

namespace vllm_lookahead {
namespace {

void recycle_update_cpu(at::Tensor& table, const at::Tensor& tokens, const at::Tensor& topk) {
  check_recycle_update(table, tokens, topk);
  const int64_t vocab = table.size(0), k = table.size(1), width = topk.size(1);
  const int32_t* tok = tokens.data_ptr<int32_t>();
  const int32_t* top = topk.data_ptr<int32_t>();
  int32_t* t = table.data_ptr<int32_t>();
  for (int64_t i = 0; i < tokens.size(0); ++i) {
    TORCH_CHECK_VALUE(tok[i] >= 0 && tok[i] < vocab, "recycle_update: token ", tok[i],
                      " outside the vocabulary [0, ", vocab, ")");
  }
  // Rows in order: a later row of the same token wins.
  for (int64_t i = 0; i < tokens.size(0); ++i) {
    for (int64_t r = 0; r < k; ++r) t[tok[i] * k + r] = top[i * width + r];
  }
}

at::Tensor recycle_tree_cpu(const at::Tensor& table, const at::Tensor& roots,
                            const at::Tensor& parents, const at::Tensor& ranks) {
  check_recycle_tree(table, roots, parents, ranks);
  check_template_order(parents, "recycle_tree");
  const int64_t batch = roots.size(0), nodes = parents.size(0);
  auto out = at::full({batch, nodes}, -1, roots.options());
  const int32_t* root = roots.data_ptr<int32_t>();
  for (int64_t b = 0; b < batch; ++b) {
    recycle_walk(table.data_ptr<int32_t>(), table.size(0), table.size(1), root[b],
                 parents.data_ptr<int32_t>(), ranks.data_ptr<int32_t>(), nodes,
                 out.data_ptr<int32_t>() + b * nodes);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(vllm_lookahead, CPU, m) {
  m.impl("recycle_update", &recycle_update_cpu);
  m.impl("recycle_tree", &recycle_tree_cpu);
}

}  // namespace vllm_lookahead
