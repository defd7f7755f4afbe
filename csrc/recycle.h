// Token recycling (arXiv 2408.08696): a successor table of the target's top-k
// next tokens per token, and the draft tree a tree template reads from it.
// Shared by the CPU (recycle_cpu.cpp) and CUDA (recycle_cuda.cu) builds.
//
// table   int32 [V, K]: table[t, r] = the target's rank-r next token the last
//         time t was an input row of a forward (-1: never seen).
// A template of T nodes: parents[j] (-1: child of the root, parents before
// children) and ranks[j] (< 0: node disabled, and with it its subtree).
// Node j of request b reads table[token of its parent, ranks[j]]; the root's
// token is roots[b]. A node is -1 where its parent is -1 or disabled or the
// entry is unknown.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace vllm_lookahead {

LA_HOST_DEVICE void recycle_walk(const int32_t* table, int64_t vocab, int64_t ranks_per_token,
                                 int32_t root, const int32_t* parents, const int32_t* ranks,
                                 int64_t nodes, int32_t* out) {
  for (int64_t j = 0; j < nodes; ++j) {
    const int32_t parent = parents[j];
    const int32_t from = parent < 0 ? root : out[parent];
    const int32_t rank = ranks[j];
    out[j] = (from < 0 || from >= vocab || rank < 0 || rank >= ranks_per_token)
                 ? -1
                 : table[static_cast<int64_t>(from) * ranks_per_token + rank];
  }
}

}  // namespace vllm_lookahead
