// Shape/dtype checks shared by the CPU and CUDA bindings of the n-gram pool.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#include "ngram_pool.h"

namespace vllm_lookahead {

inline void check_int_tensor(const at::Tensor& t, const char* name,
                             at::ScalarType dtype, int64_t dim,
                             const at::Device& device) {
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, name, " must be ", dtype, ", got ",
                    t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == dim, name, " must have ", dim, " dims, got ",
                    t.dim());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK_VALUE(t.device() == device, name, " must be on ", device, ", got ",
                    t.device());
}

// Validates the pool state tensors and returns a view over them.
inline PoolView make_pool_view(at::Tensor& keys, at::Tensor& entries,
                               at::Tensor& sizes, at::Tensor& stamps,
                               at::Tensor& clock, int64_t ways) {
  const auto dev = keys.device();
  check_int_tensor(keys, "keys", at::kInt, 3, dev);
  check_int_tensor(entries, "entries", at::kInt, 4, dev);
  check_int_tensor(sizes, "sizes", at::kInt, 2, dev);
  check_int_tensor(stamps, "stamps", at::kLong, 2, dev);
  check_int_tensor(clock, "clock", at::kLong, 1, dev);
  const int64_t S = keys.size(0), B = keys.size(1);
  TORCH_CHECK_VALUE(entries.size(0) == S && entries.size(1) == B &&
                        sizes.size(0) == S && sizes.size(1) == B &&
                        stamps.size(0) == S && stamps.size(1) == B &&
                        clock.size(0) == S,
                    "pool state tensors disagree on [slots, buckets]");
  TORCH_CHECK_VALUE(ways >= 1 && B % ways == 0,
                    "buckets per slot must be a multiple of ways");
  TORCH_CHECK_VALUE(keys.size(2) >= 1 && entries.size(2) >= 1 && entries.size(3) >= 1,
                    "key length, capacity and continuation length must be >= 1");
  return PoolView{keys.data_ptr<int32_t>(),   entries.data_ptr<int32_t>(),
                  sizes.data_ptr<int32_t>(),  stamps.data_ptr<int64_t>(),
                  clock.data_ptr<int64_t>(),  static_cast<int>(B),
                  static_cast<int>(ways),     static_cast<int>(keys.size(2)),
                  static_cast<int>(entries.size(2)),
                  static_cast<int>(entries.size(3))};
}

inline void check_insert_args(const at::Tensor& keys, const at::Tensor& slots,
                              const at::Tensor& tokens, const at::Tensor& rows,
                              const at::Tensor& starts, const at::Tensor& ends,
                              int64_t shared_slot) {
  const auto dev = keys.device();
  check_int_tensor(slots, "slots", at::kInt, 1, dev);
  check_int_tensor(tokens, "tokens", at::kInt, 2, dev);
  check_int_tensor(rows, "rows", at::kInt, 1, dev);
  check_int_tensor(starts, "starts", at::kInt, 1, dev);
  check_int_tensor(ends, "ends", at::kInt, 1, dev);
  const int64_t n = slots.size(0);
  TORCH_CHECK_VALUE(rows.size(0) == n && starts.size(0) == n && ends.size(0) == n,
                    "slots, rows, starts and ends must have the same length");
  TORCH_CHECK_VALUE(shared_slot >= -1 && shared_slot < keys.size(0),
                    "shared_slot out of range: ", shared_slot);
}

// Checks the lookup arguments and allocates its outputs: continuations
// [n, max_guesses, L] filled with -1, and counts [n].
inline std::tuple<at::Tensor, at::Tensor> prepare_lookup(
    const at::Tensor& keys, const PoolView& p, const at::Tensor& slots,
    const at::Tensor& query, int64_t max_guesses, int64_t shared_slot) {
  check_int_tensor(slots, "slots", at::kInt, 1, keys.device());
  check_int_tensor(query, "query", at::kInt, 2, keys.device());
  TORCH_CHECK_VALUE(query.size(0) == slots.size(0) && query.size(1) == p.key_len,
                    "query must be [len(slots), key_len=", p.key_len, "]");
  TORCH_CHECK_VALUE(max_guesses >= 0, "max_guesses must be >= 0");
  TORCH_CHECK_VALUE(shared_slot >= -1 && shared_slot < keys.size(0),
                    "shared_slot out of range: ", shared_slot);
  const int64_t n = slots.size(0);
  return {at::full({n, max_guesses, p.cont_len}, -1, slots.options()),
          at::zeros({n}, slots.options())};
}

}  // namespace vllm_lookahead
