// Input checks that must not cost a training step: one vectorised pass, no temporaries.
#pragma once

#include <algorithm>

#include "common.hpp"

namespace sparsekit {

// True when no element is NaN or Inf. x - x is 0 for finite x and NaN otherwise; summing those
// keeps the loop branch-free so it vectorises, and a NaN anywhere makes the sum NaN.
template <typename T>
bool all_finite(const T* a, int64_t size) {
  constexpr int64_t kChunk = 1 << 16;
  const int64_t n_chunks = (size + kChunk - 1) / kChunk;
  int bad = 0;
#pragma omp parallel for schedule(guided) reduction(| : bad)
  for (int64_t chunk = 0; chunk < n_chunks; ++chunk) {
    const int64_t start = chunk * kChunk, stop = std::min(size, start + kChunk);
    T acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = start; i < stop; ++i) acc += a[i] - a[i];
    bad |= !(acc == T(0));
  }
  return !bad;
}

}  // namespace sparsekit
