// Operator schemas of the vllm_lookahead library. Implementations register
// per device: *_cpu.cpp (CPU) and *_cuda.cu (CUDA).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(vllm_lookahead, m) {
  // Insert all n-grams of tokens[rows[i], starts[i]:ends[i]] into slot
  // slots[i] and, when shared_slot >= 0, into the shared slot too.
  m.def(
      "ngram_pool_insert(Tensor(a!) keys, Tensor(b!) entries, Tensor(c!) sizes, "
      "Tensor(d!) stamps, Tensor(e!) clock, int ways, Tensor slots, "
      "Tensor tokens, Tensor rows, Tensor starts, Tensor ends, int vocab_size, "
      "int shared_slot) -> ()");
  // Up to max_guesses continuations per query key: the slot's own, most
  // recent first, then the shared slot's, de-duplicated.
  m.def(
      "ngram_pool_lookup(Tensor keys, Tensor entries, Tensor sizes, "
      "Tensor stamps, Tensor clock, int ways, Tensor slots, Tensor query, "
      "int max_guesses, int shared_slot) -> (Tensor, Tensor)");
  // Lookahead decoding's token trees of a batch (lookahead_tree_cpu.cpp):
  // per request the first columns of its Jacobi window's filled levels, then
  // one trie of its recycled tree (recycled [batch, T], -1: absent, shaped by
  // recycled_parents [T]) and its pool candidates, fitted under caps[b]
  // nodes. Returns tokens, parents (request-local, -1: the root) and node
  // classes, each [batch, levels * window + T + guesses * cont_len]
  // (padded), node counts and the window columns used.
  m.def(
      "lookahead_tree_layout(Tensor grids, Tensor filled, Tensor columns, "
      "Tensor candidates, Tensor candidate_lens, Tensor recycled, "
      "Tensor recycled_parents, Tensor caps, int max_ranks) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Token recycling (recycle.h): table[tokens[i]] = topk[i, :K] in row order
  // (a later row of the same token wins).
  m.def("recycle_update(Tensor(a!) table, Tensor tokens, Tensor topk) -> ()");
  // The recycled draft tree of every request: template node j reads
  // table[token of its parent, ranks[j]] from roots[b] (-1: none).
  m.def("recycle_tree(Tensor table, Tensor roots, Tensor parents, Tensor ranks) -> Tensor");
  // Token trees (layout in tree.h): ancestor bitmasks from parent indices.
  m.def("tree_ancestor_masks(Tensor parents, Tensor cu_nodes, int words) -> Tensor");
  // Attention of every tree node over its request's paged KV prefix plus its
  // ancestors and itself.
  m.def(
      "tree_attention(Tensor query, Tensor tree_key, Tensor tree_value, "
      "Tensor key_cache, Tensor value_cache, Tensor block_table, "
      "Tensor prefix_lens, Tensor cu_nodes, Tensor masks, float scale) -> Tensor");
  // cache[dst_slots[i]] = cache[src_slots[i]] for every cache, all sources
  // read before any destination is written.
  m.def(
      "tree_kv_compact(Tensor(a!)[] key_caches, Tensor(b!)[] value_caches, "
      "Tensor src_slots, Tensor dst_slots) -> ()");
  // Greedy acceptance: the deepest node whose whole path matches the
  // target's argmax, that path (request-local indices), and the bonus token.
  m.def(
      "tree_accept_greedy(Tensor parents, Tensor tokens, Tensor root_argmax, "
      "Tensor node_argmax, Tensor cu_nodes, int max_depth) -> (Tensor, Tensor, Tensor)");
}

// Makes the extension importable as a Python module; importing it runs the
// static registrations above.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                                      nullptr};
  return PyModule_Create(&module);
}
