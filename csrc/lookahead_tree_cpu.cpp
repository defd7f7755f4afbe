// Lookahead decoding's token trees for a whole batch, one call per step (CPU:
// the proposer runs on the host). Semantics: vllm_lookahead/proposers/jacobi.py
// (fit_tree, tree_layout); reference: ops.reference_lookahead_tree_layout.

#include <algorithm>
#include <tuple>
#include <vector>

#include "ngram_pool_binding.h"
#include "recycle_binding.h"

namespace vllm_lookahead {
namespace {

// Columns and candidates (w <= window, g <= guesses) whose tree has at most
// cap nodes: both scaled down in proportion, then topped up, candidates first.
std::pair<int64_t, int64_t> fit_tree(int64_t cap, int64_t window, int64_t guesses,
                                     int64_t filled, int64_t cont_len) {
  const int64_t full = window * filled + guesses * cont_len;
  if (full <= cap) return {window, guesses};
  int64_t w = window * cap / full, g = guesses * cap / full;
  while (g < guesses && w * filled + (g + 1) * cont_len <= cap) ++g;
  while (w < window && (w + 1) * filled + g * cont_len <= cap) ++w;
  return {w, g};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lookahead_tree_layout_cpu(const at::Tensor& grids, const at::Tensor& filled,
                          const at::Tensor& columns, const at::Tensor& candidates,
                          const at::Tensor& candidate_lens, const at::Tensor& recycled,
                          const at::Tensor& recycled_parents, const at::Tensor& caps,
                          int64_t max_ranks) {
  const auto cpu = at::Device(at::kCPU);
  check_int_tensor(grids, "grids", at::kInt, 3, cpu);
  check_int_tensor(filled, "filled", at::kInt, 1, cpu);
  check_int_tensor(columns, "columns", at::kInt, 1, cpu);
  check_int_tensor(candidates, "candidates", at::kInt, 3, cpu);
  check_int_tensor(candidate_lens, "candidate_lens", at::kInt, 2, cpu);
  check_int_tensor(recycled, "recycled", at::kInt, 2, cpu);
  check_int_tensor(recycled_parents, "recycled_parents", at::kInt, 1, cpu);
  check_int_tensor(caps, "caps", at::kInt, 1, cpu);
  const int64_t batch = grids.size(0), levels = grids.size(1), width = grids.size(2);
  const int64_t guesses = candidates.size(1), cont_len = candidates.size(2);
  TORCH_CHECK_VALUE(filled.size(0) == batch && columns.size(0) == batch &&
                        caps.size(0) == batch && candidates.size(0) == batch &&
                        candidate_lens.size(0) == batch &&
                        candidate_lens.size(1) == guesses,
                    "lookahead_tree_layout: inputs disagree on the batch or guesses");
  const int64_t template_nodes = recycled_parents.size(0);
  TORCH_CHECK_VALUE(recycled.size(0) == batch && recycled.size(1) == template_nodes,
                    "lookahead_tree_layout: recycled must be [batch, len(recycled_parents)]");
  check_template_order(recycled_parents, "lookahead_tree_layout: recycled_parents");
  const int32_t* rec_par = recycled_parents.data_ptr<int32_t>();
  TORCH_CHECK_VALUE(max_ranks >= 1, "max_ranks must be >= 1");
  TORCH_CHECK_VALUE(cont_len <= levels,
                    "candidates longer than the window's levels have no class");
  const int64_t max_nodes = levels * width + template_nodes + guesses * cont_len;
  const int64_t recycled_class = levels * width + max_ranks * levels;
  std::vector<int32_t> mapped(template_nodes);
  auto tokens = at::zeros({batch, max_nodes}, grids.options());
  auto parents = at::full({batch, max_nodes}, -1, grids.options());
  auto classes = at::full({batch, max_nodes}, -1, grids.options());
  auto num_nodes = at::zeros({batch}, grids.options());
  auto used_columns = at::zeros({batch}, grids.options());
  const int32_t *grid = grids.data_ptr<int32_t>(), *fil = filled.data_ptr<int32_t>(),
                *col = columns.data_ptr<int32_t>(), *cand = candidates.data_ptr<int32_t>(),
                *lens = candidate_lens.data_ptr<int32_t>(), *cap = caps.data_ptr<int32_t>(),
                *rec = recycled.data_ptr<int32_t>();
  int32_t* tok_out = tokens.data_ptr<int32_t>();
  int32_t* par_out = parents.data_ptr<int32_t>();
  int32_t* cls_out = classes.data_ptr<int32_t>();
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t f = fil[b];
    TORCH_CHECK_VALUE(f >= 1 && f <= levels, "request ", b, ": filled ", f,
                      " outside 1..", levels);
    TORCH_CHECK_VALUE(col[b] >= 0 && col[b] <= width, "request ", b, ": columns ",
                      col[b], " outside 0..", width);
    TORCH_CHECK_VALUE(cap[b] >= 0, "request ", b, ": negative cap");
    const int32_t* len = lens + b * guesses;
    int64_t kept = 0;
    for (int64_t r = 0; r < guesses; ++r) {
      TORCH_CHECK_VALUE(len[r] >= 0 && len[r] <= cont_len, "request ", b,
                        ": candidate length ", len[r], " outside 0..", cont_len);
      kept += len[r] > 0;
    }
    // Recycled nodes whose whole path is present come first under the cap.
    const int32_t* rb = rec + b * template_nodes;
    int64_t present = 0;
    for (int64_t j = 0; j < template_nodes; ++j) {
      mapped[j] = (rb[j] >= 0 && (rec_par[j] < 0 || mapped[rec_par[j]] >= 0)) ? 0 : -1;
      present += mapped[j] == 0;
    }
    const int64_t recycled_cap = std::min<int64_t>(present, cap[b]);
    const auto [w, g] = fit_tree(cap[b] - recycled_cap, col[b], kept, f, cont_len);
    const int64_t limit = std::min<int64_t>(cap[b], max_nodes);
    int32_t* t = tok_out + b * max_nodes;
    int32_t* p = par_out + b * max_nodes;
    int32_t* c = cls_out + b * max_nodes;
    int64_t n = 0;
    // Window: level l column j under level l-1 column j; level 0 a chain.
    for (int64_t l = 0; l < f && n < limit; ++l) {
      for (int64_t j = 0; j < w && n < limit; ++j, ++n) {
        t[n] = grid[(b * levels + l) * width + j];
        p[n] = static_cast<int32_t>(l == 0 ? j - 1 : n - w);
        c[n] = static_cast<int32_t>(l * width + j);
      }
    }
    // One trie under the root: the recycled tree (template order, node j's
    // class recycled_class + j), then the candidates in rank order (class:
    // rank and depth); a node keeps the class of the first to reach it.
    const int64_t trie = n;
    auto child = [&](int32_t parent, int32_t token) -> int64_t {
      for (int64_t m = trie; m < n; ++m) {
        if (p[m] == parent && t[m] == token) return m;
      }
      return -1;
    };
    for (int64_t j = 0; j < template_nodes; ++j) {
      if (mapped[j] < 0) continue;
      const int32_t parent = rec_par[j] < 0 ? -1 : mapped[rec_par[j]];
      if (rec_par[j] >= 0 && parent < 0) {  // parent cut by the cap
        mapped[j] = -1;
        continue;
      }
      int64_t node = child(parent, rb[j]);
      if (node < 0) {
        if (n == limit) {
          mapped[j] = -1;
          continue;
        }
        node = n++;
        t[node] = rb[j];
        p[node] = parent;
        c[node] = static_cast<int32_t>(recycled_class + j);
      }
      mapped[j] = static_cast<int32_t>(node);
    }
    for (int64_t r = 0, taken = 0; r < guesses && taken < g && n < limit; ++r) {
      if (len[r] == 0) continue;
      ++taken;
      const int32_t* seq = cand + (b * guesses + r) * cont_len;
      const int64_t first = levels * width + std::min(r, max_ranks - 1) * levels;
      int32_t parent = -1;
      for (int64_t d = 0; d < len[r]; ++d) {
        int64_t node = child(parent, seq[d]);
        if (node < 0) {
          if (n == limit) break;
          node = n++;
          t[node] = seq[d];
          p[node] = parent;
          c[node] = static_cast<int32_t>(first + d);
        }
        parent = static_cast<int32_t>(node);
      }
    }
    num_nodes.data_ptr<int32_t>()[b] = static_cast<int32_t>(n);
    used_columns.data_ptr<int32_t>()[b] = static_cast<int32_t>(w);
  }
  return {tokens, parents, classes, num_nodes, used_columns};
}

}  // namespace

TORCH_LIBRARY_IMPL(vllm_lookahead, CPU, m) {
  m.impl("lookahead_tree_layout", &lookahead_tree_layout_cpu);
}

}  // namespace vllm_lookahead
