// The ghost-grads term's row-wise epilogues (Anthropic, Circuits Updates, January 2024), fused so
// each is one pass over the [B, d] ghost reconstruction; the GEMMs over dead latents run in torch.
#pragma once

#include <cmath>

#include "common.hpp"

namespace sparsekit {

// ghost [B, d] (overwritten with ghost * scale), residual [B, d] ->
// scale[b] = ||residual[b]|| / (2 ||ghost[b]|| + eps), row_error[b] = ||ghost[b] * scale[b] - residual[b]||^2.
template <typename T>
void ghost_rescale(T* ghost, const T* residual, int64_t rows, int64_t d, T eps, T* scale, T* row_error) {
#pragma omp parallel for schedule(guided)
  for (int64_t b = 0; b < rows; ++b) {
    T* g = ghost + b * d;
    const T* r = residual + b * d;
    T g2 = 0, r2 = 0;
#pragma omp simd reduction(+ : g2, r2)
    for (int64_t i = 0; i < d; ++i) {
      g2 += g[i] * g[i];
      r2 += r[i] * r[i];
    }
    const T s = std::sqrt(r2) / (2 * std::sqrt(g2) + eps);
    T err = 0;
#pragma omp simd reduction(+ : err)
    for (int64_t i = 0; i < d; ++i) {
      g[i] *= s;
      const T diff = g[i] - r[i];
      err += diff * diff;
    }
    scale[b] = s;
    row_error[b] = err;
  }
}

// The gradient of (coefficient / 2) * sum_b row_error[b] with respect to the ghost before rescaling,
// the scale held constant: grad_ghost[b] = coefficient * scale[b] * (ghost[b] - residual[b]), with
// ghost the rescaled reconstruction that ghost_rescale wrote.
template <typename T>
void ghost_rescale_backward(const T* ghost, const T* residual, const T* scale, int64_t rows, int64_t d,
                            T coefficient, T* grad_ghost) {
#pragma omp parallel for schedule(guided)
  for (int64_t b = 0; b < rows; ++b) {
    const T c = coefficient * scale[b];
    const T* g = ghost + b * d;
    const T* r = residual + b * d;
    T* out = grad_ghost + b * d;
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) out[i] = c * (g[i] - r[i]);
  }
}

}  // namespace sparsekit
