// This CPU's float32 multiply-add rate, the compute roof a float32 GEMM runs under: every thread
// runs independent chains of vector multiply-adds on registers (no memory traffic), enough chains
// to cover the instruction's latency on every ISA level this module is built for. The bench
// (bench/cpu_passes.py) divides the FLOPs by the time: a float32 GEMM cannot beat this rate, so a
// TopK step that must run one cannot beat that GEMM's time at this rate.
#pragma once

#include <cstdint>

#include "common.hpp"

namespace sparsekit {

constexpr int kPeakChains = 12;  // >= FMA latency (4-5 cycles) x 2 issue ports

// Runs `rounds` rounds of kPeakChains vector FMAs on each of the OpenMP threads; returns the
// float32 FLOPs done (2 per lane per FMA) and writes a value depending on every chain to *sink
// (so the compiler cannot drop the work).
inline double fma_peak_flops(int64_t rounds, float* sink) {
  typedef float V __attribute__((vector_size(kVectorBytes)));
  constexpr int kLanes = kVectorBytes / sizeof(float);
  int threads = 1;
  float total = 0.0f;
#pragma omp parallel reduction(+ : total)
  {
#ifdef _OPENMP
#pragma omp single
    threads = omp_get_num_threads();
#endif
    V acc[kPeakChains];
    for (int j = 0; j < kPeakChains; ++j) acc[j] = V{} + 1e-3f * float(j + 1);
    V a = V{} + 0.999999f, b = V{} + 1e-7f;
    __asm__ volatile("" : "+x"(a), "+x"(b));  // not constants: the loop cannot be folded
    for (int64_t r = 0; r < rounds; ++r) {
#pragma GCC unroll 12
      for (int j = 0; j < kPeakChains; ++j) acc[j] = acc[j] * a + b;
    }
    for (int j = 0; j < kPeakChains; ++j)
      for (int l = 0; l < kLanes; ++l) total += acc[j][l];
  }
  *sink = total;
  return 2.0 * kLanes * kPeakChains * double(rounds) * threads;
}

}  // namespace sparsekit
