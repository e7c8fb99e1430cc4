// The instruction-set levels this CPU runs, asked of the CPU itself (cpuid, with the OS's support
// for the wider registers checked by the compiler's runtime), for the loader that picks one of the
// extension modules built per level (sparsekit/ops/cpu/isa.py).
//
// cpu_isa_levels(): the levels this CPU supports, best first, always ending in "baseline":
//   "avx512"   x86-64-v4: AVX-512 F/BW/CD/DQ/VL on top of x86-64-v3
//   "avx2"     x86-64-v3: AVX2, FMA, BMI1/2, F16C, LZCNT, MOVBE
//   "baseline" what the compiler targets by default (x86-64: SSE2; other architectures: their base)
// This header is compiled into every module, including the baseline one, so nothing here may
// depend on the level the module was compiled for.
#pragma once

#include <string>
#include <vector>

namespace sparsekit {

inline std::vector<std::string> cpu_isa_levels() {
  std::vector<std::string> levels;
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
#if !defined(__clang__) && __GNUC__ >= 12
  const bool v3 = __builtin_cpu_supports("x86-64-v3");
  const bool v4 = __builtin_cpu_supports("x86-64-v4");
#else  // older compilers: the features of each level, one by one
  const bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                  __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("f16c");
  const bool v4 = v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
                  __builtin_cpu_supports("avx512vl");
#endif
  if (v3 && v4) levels.push_back("avx512");
  if (v3) levels.push_back("avx2");
#endif
  levels.push_back("baseline");
  return levels;
}

// The level this module was compiled for (set by CMakeLists.txt, one module per level).
inline const char* compiled_isa() {
#if defined(SPARSEKIT_ISA)
  return SPARSEKIT_ISA;
#else
  return "baseline";
#endif
}

}  // namespace sparsekit
