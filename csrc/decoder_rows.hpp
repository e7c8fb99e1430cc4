// The unit-norm decoder's per-step constraints, one pass over the [n, d] decoder each
// (torch's composition takes four to six): remove from each row's gradient its component along
// the row, and rescale each row to unit norm.
#pragma once

#include <algorithm>
#include <cmath>

#include "common.hpp"

namespace sparsekit {

// grad[r] -= (grad[r] . w[r]) w[r] / max(||w[r]||, 1e-12)^2 for each row r of W [n, d].
template <typename T>
void remove_parallel_rows(const T* W, T* grad, int64_t n, int64_t d) {
#pragma omp parallel for schedule(guided)
  for (int64_t r = 0; r < n; ++r) {
    const T* w = W + r * d;
    T* g = grad + r * d;
    T w2 = 0, wg = 0;
#pragma omp simd reduction(+ : w2, wg)
    for (int64_t i = 0; i < d; ++i) {
      w2 += w[i] * w[i];
      wg += w[i] * g[i];
    }
    const T norm = std::max(std::sqrt(w2), T(1e-12));
    const T coef = wg / (norm * norm);
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) g[i] -= coef * w[i];
  }
}

// w[r] /= max(||w[r]||, 1e-12) for each row r of W [n, d], in place.
template <typename T>
void normalize_rows(T* W, int64_t n, int64_t d) {
#pragma omp parallel for schedule(guided)
  for (int64_t r = 0; r < n; ++r) {
    T* w = W + r * d;
    T w2 = 0;
#pragma omp simd reduction(+ : w2)
    for (int64_t i = 0; i < d; ++i) w2 += w[i] * w[i];
    const T inv = T(1) / std::max(std::sqrt(w2), T(1e-12));
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) w[i] *= inv;
  }
}

}  // namespace sparsekit
