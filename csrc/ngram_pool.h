// N-gram pool: a bounded, set-associative table of continuations per request.
//
// Shared by the CPU kernels (ngram_pool_cpu.cpp) and the CUDA kernels
// (ngram_pool_cuda.cu): every function here is plain C++ on raw pointers so
// both compilers build the same logic, and the Python reference in
// vllm_lookahead/ops.py mirrors it line by line.
//
// Layout (S slots, B buckets per slot, W ways, key of K tokens, up to C
// continuations of L tokens per key):
//   keys    int32 [S, B, K]  keys[s, b, 0] == -1 marks an empty bucket
//   entries int32 [S, B, C, L]  most recent continuation first
//   sizes   int32 [S, B]     number of valid continuations
//   stamps  int64 [S, B]     insertion clock of the bucket's last insert
//   clock   int64 [S]        per-slot insertion clock
// A key hashes to a set of W consecutive buckets. Inserting a new key into a
// full set evicts the bucket inserted into least recently (lowest stamp,
// then lowest index), so memory is fixed at allocation time.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace vllm_lookahead {

struct PoolView {
  int32_t* keys;
  int32_t* entries;
  int32_t* sizes;
  int64_t* stamps;
  int64_t* clock;
  int num_buckets;
  int ways;
  int key_len;
  int capacity;
  int cont_len;
};

// FNV-1a over the key tokens; the Python reference computes the same value.
LA_HOST_DEVICE int first_bucket_of_set(const PoolView& p, const int32_t* key) {
  uint32_t h = 2166136261u;
  for (int i = 0; i < p.key_len; ++i) {
    h = (h ^ static_cast<uint32_t>(key[i])) * 16777619u;
  }
  const uint32_t num_sets = static_cast<uint32_t>(p.num_buckets / p.ways);
  return static_cast<int>(h % num_sets) * p.ways;
}

LA_HOST_DEVICE int64_t bucket_index(const PoolView& p, int slot, int bucket) {
  return static_cast<int64_t>(slot) * p.num_buckets + bucket;
}

LA_HOST_DEVICE bool key_equals(const PoolView& p, int64_t bucket,
                               const int32_t* key) {
  const int32_t* stored = p.keys + bucket * p.key_len;
  for (int i = 0; i < p.key_len; ++i) {
    if (stored[i] != key[i]) return false;
  }
  return true;
}

// Bucket holding `key` in `slot`, or -1.
LA_HOST_DEVICE int64_t find_bucket(const PoolView& p, int slot,
                                   const int32_t* key) {
  const int first = first_bucket_of_set(p, key);
  for (int w = 0; w < p.ways; ++w) {
    const int64_t b = bucket_index(p, slot, first + w);
    if (p.keys[b * p.key_len] >= 0 && key_equals(p, b, key)) return b;
  }
  return -1;
}

LA_HOST_DEVICE bool cont_equals(const int32_t* a, const int32_t* b, int len) {
  for (int i = 0; i < len; ++i) {
    if (a[i] != b[i]) return false;
  }
  return true;
}

LA_HOST_DEVICE void copy_tokens(int32_t* dst, const int32_t* src, int len) {
  for (int i = 0; i < len; ++i) dst[i] = src[i];
}

// Insert one (key, continuation) pair; the continuation becomes the most
// recent one for its key (moved to the front if already present).
LA_HOST_DEVICE void insert_ngram(const PoolView& p, int slot, const int32_t* key,
                                 const int32_t* cont) {
  int64_t b = find_bucket(p, slot, key);
  if (b < 0) {
    const int first = first_bucket_of_set(p, key);
    int64_t victim = -1;
    for (int w = 0; w < p.ways; ++w) {
      const int64_t cand = bucket_index(p, slot, first + w);
      if (p.keys[cand * p.key_len] < 0) {
        victim = cand;
        break;
      }
      if (victim < 0 || p.stamps[cand] < p.stamps[victim]) victim = cand;
    }
    b = victim;
    copy_tokens(p.keys + b * p.key_len, key, p.key_len);
    p.sizes[b] = 0;
  }
  int32_t* ents = p.entries + b * p.capacity * p.cont_len;
  int size = p.sizes[b];
  int pos = size;
  for (int j = 0; j < size; ++j) {
    if (cont_equals(ents + j * p.cont_len, cont, p.cont_len)) {
      pos = j;
      break;
    }
  }
  if (pos == size) {
    if (size < p.capacity) {
      ++size;
    } else {
      pos = size - 1;
    }
  }
  for (int j = pos; j > 0; --j) {
    copy_tokens(ents + j * p.cont_len, ents + (j - 1) * p.cont_len, p.cont_len);
  }
  copy_tokens(ents, cont, p.cont_len);
  p.sizes[b] = size;
  p.stamps[b] = ++p.clock[slot];
}

// Insert every n-gram (K + L tokens) lying inside tokens[start:end].
LA_HOST_DEVICE void insert_span(const PoolView& p, int slot, const int32_t* tokens,
                                int start, int end) {
  const int n = p.key_len + p.cont_len;
  for (int i = start; i + n <= end; ++i) {
    insert_ngram(p, slot, tokens + i, tokens + i + p.key_len);
  }
}

// Append the continuations of `key` in `slot` (most recent first) to
// out[count:], skipping ones already present; returns the new count.
LA_HOST_DEVICE int collect_continuations(const PoolView& p, int slot,
                                         const int32_t* key, int max_guesses,
                                         int32_t* out, int count) {
  const int64_t b = find_bucket(p, slot, key);
  if (b < 0) return count;
  const int32_t* ents = p.entries + b * p.capacity * p.cont_len;
  for (int j = 0; j < p.sizes[b] && count < max_guesses; ++j) {
    const int32_t* cand = ents + j * p.cont_len;
    bool seen = false;
    for (int g = 0; g < count && !seen; ++g) {
      seen = cont_equals(out + g * p.cont_len, cand, p.cont_len);
    }
    if (!seen) {
      copy_tokens(out + count * p.cont_len, cand, p.cont_len);
      ++count;
    }
  }
  return count;
}

// Request pool first, then the shared pool (shared_slot < 0: none).
LA_HOST_DEVICE int lookup_key(const PoolView& p, int slot, int shared_slot,
                              const int32_t* key, int max_guesses, int32_t* out) {
  int count = collect_continuations(p, slot, key, max_guesses, out, 0);
  if (shared_slot >= 0 && shared_slot != slot) {
    count = collect_continuations(p, shared_slot, key, max_guesses, out, count);
  }
  return count;
}

}  // namespace vllm_lookahead
