// CPU implementation of the tree ops.

#include <limits>
#include <vector>

#include "tree_binding.h"

namespace vllm_lookahead {
namespace {

// Host-side structure checks: offsets monotone, parents precede children,
// every tree fits in the mask words.
void check_tree_structure(const at::Tensor& parents, const at::Tensor& cu_nodes,
                          int64_t words) {
  const int32_t* cu = cu_nodes.data_ptr<int32_t>();
  const int32_t* par = parents.data_ptr<int32_t>();
  const int64_t batch = cu_nodes.size(0) - 1;
  TORCH_CHECK_VALUE(batch >= 0 && cu[0] == 0 && cu[batch] == parents.size(0),
                    "cu_nodes must start at 0 and end at the number of nodes");
  for (int64_t b = 0; b < batch; ++b) {
    const int32_t n = cu[b + 1] - cu[b];
    TORCH_CHECK_VALUE(n >= 0 && n <= words * 64, "request ", b, " has ", n,
                      " nodes; at most ", words * 64, " fit the masks");
    for (int32_t i = 0; i < n; ++i) {
      const int32_t p = par[cu[b] + i];
      TORCH_CHECK_VALUE(p >= -1 && p < i, "node ", i, " of request ", b,
                        " has parent ", p, "; parents must precede children");
    }
  }
}

at::Tensor tree_ancestor_masks_cpu(const at::Tensor& parents, const at::Tensor& cu_nodes,
                                   int64_t words) {
  check_int_tensor(parents, "parents", at::kInt, 1, parents.device());
  check_int_tensor(cu_nodes, "cu_nodes", at::kInt, 1, parents.device());
  TORCH_CHECK_VALUE(words >= 1, "words must be >= 1");
  check_tree_structure(parents, cu_nodes, words);
  auto masks = at::zeros({parents.size(0), words}, parents.options().dtype(at::kLong));
  const int32_t* cu = cu_nodes.data_ptr<int32_t>();
  for (int64_t b = 0; b + 1 < cu_nodes.size(0); ++b) {
    build_ancestor_masks(parents.data_ptr<int32_t>() + cu[b], cu[b + 1] - cu[b],
                         static_cast<int>(words),
                         masks.data_ptr<int64_t>() + static_cast<int64_t>(cu[b]) * words);
  }
  return masks;
}

// Tree-part mask of one request: [n, n], true where key node m is the query
// node i or one of its ancestors.
at::Tensor intra_tree_mask(const at::Tensor& masks, int64_t lo, int64_t n) {
  auto local = at::arange(n, masks.options());
  auto words = masks.slice(0, lo, lo + n).index_select(1, at::floor_divide(local, 64));
  return at::bitwise_and(at::bitwise_right_shift(words, at::remainder(local, 64)), 1)
      .to(at::kBool);
}

at::Tensor tree_attention_cpu(const at::Tensor& query, const at::Tensor& tree_key,
                              const at::Tensor& tree_value, const at::Tensor& key_cache,
                              const at::Tensor& value_cache, const at::Tensor& block_table,
                              const at::Tensor& prefix_lens, const at::Tensor& cu_nodes,
                              const at::Tensor& masks, double scale) {
  const auto d = check_tree_attention_args(query, tree_key, tree_value, key_cache,
                                           value_cache, block_table, prefix_lens,
                                           cu_nodes, masks);
  const int32_t* cu = cu_nodes.data_ptr<int32_t>();
  const int32_t* prefix = prefix_lens.data_ptr<int32_t>();
  const int32_t* bt = block_table.data_ptr<int32_t>();
  const int64_t num_blocks = key_cache.size(0);
  TORCH_CHECK_VALUE(cu[0] == 0 && cu[d.batch] == d.num_nodes,
                    "cu_nodes must start at 0 and end at the number of nodes");
  for (int64_t b = 0; b < d.batch; ++b) {
    TORCH_CHECK_VALUE(cu[b] <= cu[b + 1], "cu_nodes must be non-decreasing");
    TORCH_CHECK_VALUE(cu[b + 1] - cu[b] <= d.words * 64, "request ", b,
                      " has more nodes than its mask words hold");
    TORCH_CHECK_VALUE(prefix[b] >= 0 && prefix[b] <= d.max_blocks * d.block_size,
                      "prefix length ", prefix[b], " of request ", b,
                      " exceeds its block table");
    for (int64_t j = 0; j < (prefix[b] + d.block_size - 1) / d.block_size; ++j) {
      const int32_t block = bt[b * d.max_blocks + j];
      TORCH_CHECK_VALUE(block >= 0 && block < num_blocks, "block id ", block,
                        " out of range");
    }
  }
  // Per request and KV head, all the group's query heads and nodes at once:
  // scores against [prefix keys gathered from the paged cache ; tree keys]
  // with BLAS, the tree part masked by the ancestor bits, softmax in float32.
  auto out = at::empty_like(query);
  const int64_t group = d.num_heads / d.num_kv_heads;
  const auto table = block_table.to(at::kLong);
  for (int64_t b = 0; b < d.batch; ++b) {
    const int64_t lo = cu[b], n = cu[b + 1] - cu[b], p = prefix[b];
    if (n == 0) continue;
    auto pos = at::arange(p, table.options());
    const c10::List<std::optional<at::Tensor>> where{
        table[b].index_select(0, at::floor_divide(pos, d.block_size)),
        at::remainder(pos, d.block_size)};
    auto keys = at::cat({key_cache.index(where), tree_key.slice(0, lo, lo + n)})
                    .to(at::kFloat).permute({1, 2, 0});                 // [Hkv, D, P+n]
    auto values = at::cat({value_cache.index(where), tree_value.slice(0, lo, lo + n)})
                      .to(at::kFloat).permute({1, 0, 2});               // [Hkv, P+n, D]
    auto q = query.slice(0, lo, lo + n).to(at::kFloat)
                 .view({n, d.num_kv_heads, group, d.head_size})
                 .permute({1, 0, 2, 3}).reshape({d.num_kv_heads, n * group, d.head_size});
    auto scores = at::bmm(q, keys).mul_(scale);                          // [Hkv, n*g, P+n]
    auto tree_scores = scores.narrow(2, p, n).view({d.num_kv_heads, n, group, n});
    auto hidden = intra_tree_mask(masks, lo, n).logical_not().view({1, n, 1, n});
    tree_scores.masked_fill_(hidden, -std::numeric_limits<float>::infinity());
    auto o = at::bmm(at::softmax(scores, -1), values)                   // [Hkv, n*g, D]
                 .view({d.num_kv_heads, n, group, d.head_size})
                 .permute({1, 0, 2, 3}).reshape({n, d.num_heads, d.head_size});
    out.slice(0, lo, lo + n).copy_(o);
  }
  return out;
}

void tree_kv_compact_cpu(at::TensorList key_caches, at::TensorList value_caches,
                         const at::Tensor& src_slots, const at::Tensor& dst_slots) {
  check_compact_args(key_caches, value_caches, src_slots, dst_slots);
  for (const at::TensorList caches : {key_caches, value_caches}) {
    for (const at::Tensor& cache : caches) {
      at::Tensor target = cache;
      // Gather every source before writing any destination, so a
      // destination may be another entry's source.
      if (cache.is_contiguous()) {
        auto rows = target.view({-1, cache.size(2), cache.size(3)});
        rows.index_copy_(0, dst_slots, rows.index_select(0, src_slots));
        continue;
      }
      const int64_t block_size = cache.size(1);
      auto at_slots = [&](const at::Tensor& slots) {
        return c10::List<std::optional<at::Tensor>>{at::floor_divide(slots, block_size),
                                                    at::remainder(slots, block_size)};
      };
      target.index_put_(at_slots(dst_slots), cache.index(at_slots(src_slots)));
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tree_accept_greedy_cpu(
    const at::Tensor& parents, const at::Tensor& tokens, const at::Tensor& root_argmax,
    const at::Tensor& node_argmax, const at::Tensor& cu_nodes, int64_t max_depth) {
  const auto dev = parents.device();
  for (const auto& [t, name] : {std::pair{&parents, "parents"}, {&tokens, "tokens"},
                                {&root_argmax, "root_argmax"},
                                {&node_argmax, "node_argmax"}, {&cu_nodes, "cu_nodes"}}) {
    check_int_tensor(*t, name, at::kInt, 1, dev);
  }
  const int64_t n = parents.size(0), batch = cu_nodes.size(0) - 1;
  TORCH_CHECK_VALUE(tokens.size(0) == n && node_argmax.size(0) == n &&
                        root_argmax.size(0) == batch,
                    "tokens and node_argmax must be [nodes], root_argmax [batch]");
  check_tree_structure(parents, cu_nodes, (n + 63) / 64 + 1);
  TORCH_CHECK_VALUE(max_depth >= 0, "max_depth must be >= 0");
  auto path = at::full({batch, max_depth}, -1, parents.options());
  auto num_accepted = at::zeros({batch}, parents.options());
  auto bonus = at::empty({batch}, parents.options());
  const int32_t *par = parents.data_ptr<int32_t>(), *tok = tokens.data_ptr<int32_t>(),
                *root = root_argmax.data_ptr<int32_t>(),
                *arg = node_argmax.data_ptr<int32_t>(), *cu = cu_nodes.data_ptr<int32_t>();
  std::vector<int32_t> depth(n);
  for (int64_t b = 0; b < batch; ++b) {
    int32_t best = -1, best_depth = 0;
    for (int32_t i = cu[b]; i < cu[b + 1]; ++i) {
      const int32_t p = par[i];
      const bool parent_ok = p < 0 || depth[cu[b] + p] > 0;
      const int32_t expected = p < 0 ? root[b] : arg[cu[b] + p];
      depth[i] = parent_ok && tok[i] == expected ? (p < 0 ? 1 : depth[cu[b] + p] + 1) : 0;
      if (depth[i] > best_depth) {
        best_depth = depth[i];
        best = i;
      }
    }
    TORCH_CHECK_VALUE(best_depth <= max_depth, "accepted depth ", best_depth,
                      " exceeds max_depth ", max_depth);
    num_accepted.data_ptr<int32_t>()[b] = best_depth;
    bonus.data_ptr<int32_t>()[b] = best < 0 ? root[b] : arg[best];
    for (int32_t i = best, k = best_depth - 1; i >= cu[b]; i = par[i] < 0 ? -1 : cu[b] + par[i], --k) {
      path.data_ptr<int32_t>()[b * max_depth + k] = i - cu[b];
    }
  }
  return {path, num_accepted, bonus};
}

}  // namespace

TORCH_LIBRARY_IMPL(vllm_lookahead, CPU, m) {
  m.impl("tree_ancestor_masks", &tree_ancestor_masks_cpu);
  m.impl("tree_attention", &tree_attention_cpu);
  m.impl("tree_kv_compact", &tree_kv_compact_cpu);
  m.impl("tree_accept_greedy", &tree_accept_greedy_cpu);
}

}  // namespace vllm_lookahead
