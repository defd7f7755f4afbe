// Token-tree speculation kernels shared by the CPU (tree_cpu.cpp) and CUDA
// (tree_cuda.cu) bindings; vllm_lookahead/ops.py holds their references.
//
// A batch of trees is flat: request b owns nodes [cu_nodes[b], cu_nodes[b+1]).
// parents[i] is the request-local index of node i's parent, or -1 for a
// child of the request's last accepted token; parents precede children.
// Node i attends to the request's whole KV prefix plus exactly its ancestors
// and itself, recorded as a bitmask of request-local node indices:
//   masks int64 [num_nodes, words], bit m of node i set <=> m is i or one of
//   its ancestors (words = ceil(max nodes per request / 64)).
#pragma once

#include <cmath>
#include <cstdint>

#include "host_device.h"

namespace vllm_lookahead {

LA_HOST_DEVICE bool mask_has(const int64_t* mask, int m) {
  return (static_cast<uint64_t>(mask[m >> 6]) >> (m & 63)) & 1u;
}

// Ancestor masks of one request's nodes (sequential: a parent's mask is
// complete before its children's).
LA_HOST_DEVICE void build_ancestor_masks(const int32_t* parents, int num_nodes,
                                         int words, int64_t* masks) {
  for (int i = 0; i < num_nodes; ++i) {
    int64_t* mine = masks + static_cast<int64_t>(i) * words;
    const int p = parents[i];
    for (int w = 0; w < words; ++w) {
      mine[w] = p >= 0 ? masks[static_cast<int64_t>(p) * words + w] : 0;
    }
    mine[i >> 6] = static_cast<int64_t>(static_cast<uint64_t>(mine[i >> 6]) |
                                        (uint64_t{1} << (i & 63)));
  }
}

// Running softmax state of one query head: max score, sum of exp, weighted
// values (kept by the caller).
struct OnlineSoftmax {
  float max_score = -INFINITY;
  float denom = 0.f;

  // Adds a key with score s; returns (scale for the old accumulator, weight
  // of this key's value).
  LA_HOST_DEVICE void add(float s, float& rescale, float& weight) {
    const float new_max = s > max_score ? s : max_score;
    rescale = expf(max_score - new_max);
    weight = expf(s - new_max);
    denom = denom * rescale + weight;
    max_score = new_max;
  }
};

}  // namespace vllm_lookahead
