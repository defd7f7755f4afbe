// CPU implementation of the n-gram pool ops: one call per step for the whole
// batch, rows processed in order (so a slot named twice sees both spans).
#include "ngram_pool_binding.h"

namespace vllm_lookahead {
namespace {

void ngram_pool_insert_cpu(at::Tensor& keys, at::Tensor& entries, at::Tensor& sizes,
                           at::Tensor& stamps, at::Tensor& clock, int64_t ways,
                           const at::Tensor& slots, const at::Tensor& tokens,
                           const at::Tensor& rows, const at::Tensor& starts,
                           const at::Tensor& ends, int64_t vocab_size,
                           int64_t shared_slot) {
  const PoolView p = make_pool_view(keys, entries, sizes, stamps, clock, ways);
  check_insert_args(keys, slots, tokens, rows, starts, ends, shared_slot);
  const int64_t n = slots.size(0);
  const int64_t num_slots = keys.size(0);
  const int32_t* slot_ptr = slots.data_ptr<int32_t>();
  const int32_t* row_ptr = rows.data_ptr<int32_t>();
  const int32_t* start_ptr = starts.data_ptr<int32_t>();
  const int32_t* end_ptr = ends.data_ptr<int32_t>();
  const int32_t* tok = tokens.data_ptr<int32_t>();
  const int64_t width = tokens.size(1);
  // Validate everything before mutating anything.
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(slot_ptr[i] >= 0 && slot_ptr[i] < num_slots,
                      "slot out of range: ", slot_ptr[i]);
    TORCH_CHECK_VALUE(row_ptr[i] >= 0 && row_ptr[i] < tokens.size(0),
                      "row out of range: ", row_ptr[i]);
    TORCH_CHECK_VALUE(0 <= start_ptr[i] && start_ptr[i] < end_ptr[i] &&
                          end_ptr[i] <= width,
                      "span [", start_ptr[i], ", ", end_ptr[i],
                      ") is empty or outside the token rows of width ", width);
    const int32_t* row = tok + static_cast<int64_t>(row_ptr[i]) * width;
    for (int32_t j = start_ptr[i]; j < end_ptr[i]; ++j) {
      TORCH_CHECK_VALUE(row[j] >= 0 && row[j] < vocab_size, "token id ", row[j],
                        " outside the vocabulary [0, ", vocab_size, ")");
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    const int32_t* row = tok + static_cast<int64_t>(row_ptr[i]) * width;
    insert_span(p, slot_ptr[i], row, start_ptr[i], end_ptr[i]);
    if (shared_slot >= 0 && shared_slot != slot_ptr[i]) {
      insert_span(p, static_cast<int>(shared_slot), row, start_ptr[i], end_ptr[i]);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> ngram_pool_lookup_cpu(
    at::Tensor keys, at::Tensor entries, at::Tensor sizes, at::Tensor stamps,
    at::Tensor clock, int64_t ways, const at::Tensor& slots,
    const at::Tensor& query, int64_t max_guesses, int64_t shared_slot) {
  const PoolView p = make_pool_view(keys, entries, sizes, stamps, clock, ways);
  auto [out, counts] = prepare_lookup(keys, p, slots, query, max_guesses, shared_slot);
  const int64_t n = slots.size(0);
  const int32_t* slot_ptr = slots.data_ptr<int32_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(slot_ptr[i] >= 0 && slot_ptr[i] < keys.size(0),
                      "slot out of range: ", slot_ptr[i]);
  }
  const int32_t* q = query.data_ptr<int32_t>();
  int32_t* o = out.data_ptr<int32_t>();
  int32_t* c = counts.data_ptr<int32_t>();
  for (int64_t i = 0; i < n; ++i) {
    c[i] = lookup_key(p, slot_ptr[i], static_cast<int>(shared_slot),
                      q + i * p.key_len, static_cast<int>(max_guesses),
                      o + i * max_guesses * p.cont_len);
  }
  return {out, counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(vllm_lookahead, CPU, m) {
  m.impl("ngram_pool_insert", &ngram_pool_insert_cpu);
  m.impl("ngram_pool_lookup", &ngram_pool_lookup_cpu);
}

}  // namespace vllm_lookahead
