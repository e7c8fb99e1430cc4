// Shared helpers for sparsekit's CPU kernels: OpenMP shims and the stable bucket sort that
// every sparse backward uses to stay deterministic.
#pragma once

#include <cstdint>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace sparsekit {

// Every parallel loop uses schedule(guided): on a shared machine one thread of the team often
// loses its core for a while, and static shares made the whole team wait for it (a TopK training
// step was ~6% faster with guided shares under a load average of 3-5, A/B runs alternated; an idle
// machine was not available to compare). Each output element is still computed by one thread in a fixed order, so the results
// do not depend on the schedule.
// The widest vector registers the module is built for, in bytes (AVX-512: zmm, AVX2: ymm, SSE2: xmm).
#if defined(__AVX512F__)
constexpr int kVectorBytes = 64;
#elif defined(__AVX__)
constexpr int kVectorBytes = 32;
#else
constexpr int kVectorBytes = 16;
#endif

inline int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// Stable counting sort of entry positions by key, keys in [0, n_keys).
// After the call, the entries with key c are order[offsets[c] .. offsets[c+1]) in their
// original order. Summing each bucket in that order makes every scatter-add deterministic,
// whatever the thread count.
struct Buckets {
  std::vector<int64_t> offsets;  // [n_keys + 1]
  std::vector<int64_t> order;    // [n_entries]
};

inline Buckets bucket_by_key(const int64_t* keys, int64_t n_entries, int64_t n_keys) {
  Buckets b;
  b.offsets.assign(n_keys + 1, 0);
  b.order.resize(n_entries);
  for (int64_t e = 0; e < n_entries; ++e) b.offsets[keys[e] + 1]++;
  for (int64_t c = 0; c < n_keys; ++c) b.offsets[c + 1] += b.offsets[c];
  std::vector<int64_t> cursor(b.offsets.begin(), b.offsets.end() - 1);
  for (int64_t e = 0; e < n_entries; ++e) b.order[cursor[keys[e]]++] = e;
  return b;
}

}  // namespace sparsekit
