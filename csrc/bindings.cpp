// Operator schemas of the vllm_lookahead library. Implementations register
// per device: ngram_pool_cpu.cpp (CPU) and ngram_pool_cuda.cu (CUDA).
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
}

// Makes the extension importable as a Python module; importing it runs the
// static registrations above.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                                      nullptr};
  return PyModule_Create(&module);
}
