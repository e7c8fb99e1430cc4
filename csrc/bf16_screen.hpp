// Exact float32 top-k from a bfloat16 encoder GEMM: screen, then recompute the few candidates.
//
// On CPUs with AVX512-BF16 or AMX, a bf16 GEMM (float32 accumulation) runs ~1.8x faster than the
// float32 one. Its pre-activations Q differ from the float32 ones by an amount bounded entry by
// entry from the norms of x, W and their rounding errors (row_bound / screen_margin below). So per
// row the true top-k lies among the entries whose upper bound reaches the k-th largest lower
// bound; only those candidates (typically ~2k) are recomputed in float32 from x and W_enc's
// transpose, and the top-k is taken among them with the usual order (value descending, ties to the
// lower index). The result is the float32 path's selection, from float32 dot products.
//
// pack_bf16:          float32 [size] -> bf16 bits [size], round to nearest even.
// pack_encoder_bf16:  W [d, n] -> bf16 bits of W [d, n], W^T [n, d] float32, and per column the
//                     norms of the rounded column and of its rounding error [n].
// topk_screened:      Q [rows, n] (bf16 bits) + bias -> values/indices [rows, k] of the exact
//                     float32 top-k of x @ W + bias (ReLU'd, sorted); returns the number of
//                     candidates recomputed, or -1 when Q holds a non-finite value (the caller
//                     then takes the float32 path).
// batchtopk_screened: the same for BatchTopK: the m largest over the whole block, in flat order.
// relu_screened:      the positive entries of relu(x @ W + bias) as COO, when they are few.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "common.hpp"
#include "topk_select.hpp"

namespace sparsekit {

inline uint16_t bf16_round(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  bits += 0x7FFFu + ((bits >> 16) & 1u);  // round to nearest, ties to even (inputs are finite)
  return uint16_t(bits >> 16);
}

inline float bf16_value(uint16_t h) {
  uint32_t bits = uint32_t(h) << 16;
  float v;
  std::memcpy(&v, &bits, 4);
  return v;
}

inline void pack_bf16(const float* src, int64_t size, uint16_t* dst) {
  constexpr int64_t kChunk = 1 << 16;
#pragma omp parallel for schedule(guided)
  for (int64_t c = 0; c < size; c += kChunk) {
    const int64_t stop = std::min(size, c + kChunk);
#pragma omp simd
    for (int64_t i = c; i < stop; ++i) dst[i] = bf16_round(src[i]);
  }
}

// One pass over W [d, n] in column strips: the bf16 copy Wb, the transpose WT, and per column the
// norms of the rounded column (w_norms) and of its rounding error (err_norms).
inline void pack_encoder_bf16(const float* W, int64_t d, int64_t n, uint16_t* Wb, float* WT, float* w_norms,
                              float* err_norms) {
  constexpr int64_t kStrip = 64;
#pragma omp parallel for schedule(guided)
  for (int64_t c0 = 0; c0 < n; c0 += kStrip) {
    const int64_t width = std::min(kStrip, n - c0);
    double sum_w[kStrip] = {0}, sum_err[kStrip] = {0};
    for (int64_t i = 0; i < d; ++i) {
      const float* src = W + i * n + c0;
      uint16_t* dst = Wb + i * n + c0;
      for (int64_t j = 0; j < width; ++j) {
        const float v = src[j];
        const uint16_t h = bf16_round(v);
        const double rounded = bf16_value(h);
        dst[j] = h;
        WT[(c0 + j) * d + i] = v;
        sum_w[j] += rounded * rounded;
        sum_err[j] += (double(v) - rounded) * (double(v) - rounded);
      }
    }
    for (int64_t j = 0; j < width; ++j) {
      w_norms[c0 + j] = float(std::sqrt(sum_w[j]));
      err_norms[c0 + j] = float(std::sqrt(sum_err[j]));
    }
  }
}

// The bound, entry by entry. With x' = bf16(x), dx = x - x' (and w', dw likewise), exactly
//   x.w = x'.w' + x'.dw + dx.w' + dx.dw,
// the GEMM's float32 sum S of the exact products x'_i w'_i is within gamma_d ||x'|| ||w'|| of
// x'.w' (gamma_d = d 2^-24 / (1 - d 2^-24)), Q = bf16(S) is within 2^-8 |Q| of S (round to
// nearest), and the float32 recompute is within gamma_d ||x|| ||w|| of x.w. By Cauchy-Schwarz:
//   |Q - recompute| <= coef_err ||dw|| + coef_w ||w'|| + eta |Q|,
//   coef_err = (||x'|| + ||dx||)(1 + gamma_d),  coef_w = ||dx|| + gamma_d (2 ||x'|| + ||dx||),
// using ||w|| <= ||w'|| + ||dw||. A 1.0625 safety factor covers the rounding of the norms and of
// the bound's own arithmetic; the float32 rounding of a = Q + bias (and of a -+ margin) and a
// floor for flushed denormals are added.
struct RowBound {
  float coef_err, coef_w;
};

inline RowBound row_bound(const float* x, int64_t d) {
  double sum_rounded = 0.0, sum_err = 0.0;
  for (int64_t i = 0; i < d; ++i) {
    const double rounded = bf16_value(bf16_round(x[i]));
    sum_rounded += rounded * rounded;
    sum_err += (double(x[i]) - rounded) * (double(x[i]) - rounded);
  }
  const double unit = std::ldexp(1.0, -24) * double(d);
  const double gamma = unit / (1.0 - unit), safety = 1.0625;
  const double x_rounded = std::sqrt(sum_rounded), x_err = std::sqrt(sum_err);
  return {float(safety * (x_rounded + x_err) * (1.0 + gamma)), float(safety * (x_err + gamma * (2.0 * x_rounded + x_err)))};
}

constexpr float kScreenEta = 1.0625f / 256.0f;

inline float screen_margin(float qv, float a, float b, float err_norm, float w_norm, RowBound bound) {
  constexpr float kRel = 1.0f / (1 << 20);
  constexpr float kTiny = 1e-30f;
  return bound.coef_err * err_norm + bound.coef_w * w_norm + kScreenEta * std::fabs(qv) +
         kRel * (std::fabs(a) + std::fabs(b)) + kTiny;
}

// The lower (kSign = -1) or upper (+1) bounds of entries [j0, j0 + 16) of a row, AVX-512.
#if defined(__AVX512F__)
template <int kSign>
inline __m512 bounds16(const uint16_t* q, const float* bias, const float* err_norms, const float* w_norms,
                       RowBound bound, int64_t j0, __mmask16 lanes, __mmask16& non_finite) {
  const __m512 qv = _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes, q + j0)), 16));
  const __m512 b = _mm512_maskz_loadu_ps(lanes, bias + j0);
  const __m512 a = _mm512_add_ps(qv, b);
  const __m512 rel = _mm512_fmadd_ps(_mm512_set1_ps(1.0f / (1 << 20)),
                                     _mm512_add_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)), _mm512_set1_ps(1e-30f));
  const __m512 m = _mm512_fmadd_ps(
      _mm512_set1_ps(bound.coef_err), _mm512_maskz_loadu_ps(lanes, err_norms + j0),
      _mm512_fmadd_ps(_mm512_set1_ps(bound.coef_w), _mm512_maskz_loadu_ps(lanes, w_norms + j0),
                      _mm512_fmadd_ps(_mm512_set1_ps(kScreenEta), _mm512_abs_ps(qv), rel)));
  non_finite |= _mm512_mask_cmp_ps_mask(lanes, _mm512_abs_ps(a), _mm512_set1_ps(std::numeric_limits<float>::max()),
                                        _CMP_NLE_UQ);
  return kSign > 0 ? _mm512_add_ps(a, m) : _mm512_sub_ps(a, m);
}
#endif

// One row's lower bounds into low [n] (scratch of n + 16 floats) and the maximum of each 64-entry
// chunk into chunk_max [ceil(n / 64)]; false when Q holds a non-finite value.
constexpr int64_t kScreenChunk = 64;

inline bool row_lower_bounds(const uint16_t* q, const float* bias, const float* w_norms, const float* err_norms,
                             int64_t n, RowBound bound, float* low, float* chunk_max) {
  const int64_t n_chunks = (n + kScreenChunk - 1) / kScreenChunk;
#if defined(__AVX512F__)
  __mmask16 non_finite = 0;
  for (int64_t c = 0; c < n_chunks; ++c) {
    __m512 m = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t j0 = c * kScreenChunk; j0 < std::min(n, (c + 1) * kScreenChunk); j0 += 16) {
      const __mmask16 lanes = n - j0 >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j0)) - 1);
      const __m512 l = bounds16<-1>(q, bias, err_norms, w_norms, bound, j0, lanes, non_finite);
      _mm512_mask_storeu_ps(low + j0, lanes, l);
      m = _mm512_mask_max_ps(m, lanes, m, l);
    }
    chunk_max[c] = _mm512_reduce_max_ps(m);
  }
  return !non_finite;
#else
  std::fill(chunk_max, chunk_max + n_chunks, -std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < n; ++j) {
    const float qv = bf16_value(q[j]);
    const float a = qv + bias[j];
    if (!(std::fabs(a) <= std::numeric_limits<float>::max())) return false;
    low[j] = a - screen_margin(qv, a, bias[j], err_norms[j], w_norms[j], bound);
    chunk_max[j / kScreenChunk] = std::max(chunk_max[j / kScreenChunk], low[j]);
  }
  return true;
#endif
}

// Appends to cols (in column order) every entry of the row whose upper bound reaches threshold.
inline void row_candidates(const uint16_t* q, const float* bias, const float* w_norms, const float* err_norms,
                           int64_t n, RowBound bound, float threshold, std::vector<int32_t>& cols) {
#if defined(__AVX512F__)
  __mmask16 non_finite = 0;  // already checked by row_lower_bounds
  const __m512 floor_v = _mm512_set1_ps(threshold);
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const __mmask16 lanes = n - j0 >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j0)) - 1);
    const __m512 high = bounds16<1>(q, bias, err_norms, w_norms, bound, j0, lanes, non_finite);
    for (unsigned hits = _mm512_mask_cmp_ps_mask(lanes, high, floor_v, _CMP_GE_OQ); hits; hits &= hits - 1)
      cols.push_back(int32_t(j0 + __builtin_ctz(hits)));
  }
#else
  for (int64_t j = 0; j < n; ++j) {
    const float qv = bf16_value(q[j]);
    const float a = qv + bias[j];
    if (a + screen_margin(qv, a, bias[j], err_norms[j], w_norms[j], bound) >= threshold) cols.push_back(int32_t(j));
  }
#endif
}

// Appends to pool the lower bounds low [n] at or above floor, reading only the 64-entry chunks
// whose maximum (chunk_max) reaches it.
inline void append_at_least(const float* low, const float* chunk_max, int64_t n, float floor, std::vector<float>& pool) {
  const int64_t n_chunks = (n + kScreenChunk - 1) / kScreenChunk;
  for (int64_t c = 0; c < n_chunks; ++c) {
    if (!(chunk_max[c] >= floor)) continue;
    for (int64_t j = c * kScreenChunk; j < std::min(n, (c + 1) * kScreenChunk); ++j)
      if (low[j] >= floor) pool.push_back(low[j]);
  }
}

// The m-th largest (1-based) of pool, which is reordered.
inline float mth_largest(std::vector<float>& pool, int64_t m) {
  std::nth_element(pool.begin(), pool.begin() + (m - 1), pool.end(), std::greater<float>());
  return pool[m - 1];
}

// Per row: the candidates' columns appended to cols (in column order); false on a non-finite Q.
// The k-th largest lower bound is found without a heap: row_lower_bounds writes the lower bounds
// and each 64-entry chunk's maximum; the k-th largest chunk maximum is itself a lower bound on it
// (k chunks hold an entry at least that large), so only the entries above it (~2k) are gathered
// and nth_element'd. row_candidates then takes every entry whose upper bound reaches it.
inline bool screen_row(const uint16_t* q, const float* bias, const float* w_norms, const float* err_norms, int64_t n,
                       int64_t k, RowBound bound, float* low, std::vector<float>& chunk_max, std::vector<float>& pool,
                       std::vector<int32_t>& cols) {
  const int64_t n_chunks = (n + kScreenChunk - 1) / kScreenChunk;
  chunk_max.resize(n_chunks);
  if (!row_lower_bounds(q, bias, w_norms, err_norms, n, bound, low, chunk_max.data())) return false;
  float floor_k = -std::numeric_limits<float>::infinity();
  if (n_chunks >= k) {
    pool.assign(chunk_max.begin(), chunk_max.end());
    floor_k = mth_largest(pool, k);
  }
  pool.clear();
  append_at_least(low, chunk_max.data(), n, floor_k, pool);
  row_candidates(q, bias, w_norms, err_norms, n, bound, mth_largest(pool, k), cols);
  return true;
}

// A float32 dot product in a fixed summation order whatever the pointers' alignment (16 lane sums,
// then a fixed tree): equal columns give bitwise equal pre-activations, so exact ties stay ties
// and go to the lower index, as on the float32 path. (A plain `omp simd` reduction may peel a
// different number of leading elements for each alignment.)
inline float dot_f32(const float* a, const float* b, int64_t d) {
  constexpr int kLanes = 16;
  float lanes[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes)
    for (int j = 0; j < kLanes; ++j) lanes[j] += a[i + j] * b[i + j];
  for (int j = 0; i < d; ++i, ++j) lanes[j] += a[i] * b[i];
  for (int width = kLanes / 2; width >= 1; width /= 2)
    for (int j = 0; j < width; ++j) lanes[j] += lanes[j + width];
  return lanes[0];
}

// A block of rows to screen: Q [rows, n] bf16 bits of x @ W for x [rows, d] float32 and W [d, n],
// with W's transpose WT [n, d] and column norms (pack_encoder_bf16), and bias [n].
struct ScreenedBlock {
  const uint16_t* Q;
  const float* bias;
  const float* x;
  const float* WT;
  const float* w_norms;
  const float* err_norms;
  int64_t rows, n, d;
};

// Candidates of a block of rows in row-major order (columns ascending within a row).
struct Candidates {
  std::vector<int64_t> offsets;  // [rows + 1]
  std::vector<int32_t> cols;
  std::vector<int64_t> rows;
  std::vector<float> exact;  // their float32 pre-activations, once recomputed
};

// Runs collect(r, cols) -> bool for every row in parallel (it appends row r's candidate columns);
// false when any call does.
template <typename Collect>
bool collect_candidates(int64_t rows, Collect collect, Candidates& out) {
  const int threads = max_threads();
  std::vector<int64_t> counts(rows, 0);
  std::vector<std::vector<int32_t>> local_cols(threads);
  std::vector<std::vector<int64_t>> local_rows(threads);  // the rows each thread took, in order
  bool ok = true;
#pragma omp parallel num_threads(threads) reduction(&& : ok)
  {
    const int t = thread_id();
#pragma omp for schedule(guided)
    for (int64_t r = 0; r < rows; ++r) {
      const size_t before = local_cols[t].size();
      if (!collect(r, local_cols[t])) ok = false;
      counts[r] = int64_t(local_cols[t].size() - before);
      local_rows[t].push_back(r);
    }
  }
  if (!ok) return false;
  out.offsets.assign(rows + 1, 0);
  for (int64_t r = 0; r < rows; ++r) out.offsets[r + 1] = out.offsets[r] + counts[r];
  const int64_t total = out.offsets[rows];
  out.cols.resize(total);
  out.rows.resize(total);
#pragma omp parallel num_threads(threads)
  {
    const int t = thread_id();
    size_t pos = 0;
    for (int64_t r : local_rows[t]) {
      std::copy(local_cols[t].begin() + pos, local_cols[t].begin() + pos + counts[r], out.cols.begin() + out.offsets[r]);
      for (int64_t e = out.offsets[r]; e < out.offsets[r + 1]; ++e) out.rows[e] = r;
      pos += counts[r];
    }
  }
  return true;
}

// out.exact = the candidates' float32 pre-activations x[row] . WT[col] + bias[col], grouped by
// column strips of WT that fit in L2.
inline void recompute_candidates(Candidates& c, const float* x, const float* WT, const float* bias, int64_t n,
                                 int64_t d) {
  const int64_t total = int64_t(c.cols.size());
  constexpr int64_t kStripBytes = 512 * 1024;
  const int64_t strip = std::max<int64_t>(1, kStripBytes / (d * int64_t(sizeof(float))));
  const int64_t n_strips = (n + strip - 1) / strip;
  std::vector<int64_t> keys(total);
  for (int64_t e = 0; e < total; ++e) keys[e] = c.cols[e] / strip;
  const Buckets by_strip = bucket_by_key(keys.data(), total, n_strips);
  c.exact.resize(total);
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t s = 0; s < n_strips; ++s) {
    for (int64_t p = by_strip.offsets[s]; p < by_strip.offsets[s + 1]; ++p) {
      const int64_t e = by_strip.order[p];
      const int64_t j = c.cols[e];
      c.exact[e] = dot_f32(x + c.rows[e] * d, WT + j * d, d) + bias[j];
    }
  }
}

// The block's top-k per row -> values/indices [rows, k]. Returns the candidate count or -1.
inline int64_t topk_screened(const ScreenedBlock& block, int64_t k, float* values, int64_t* indices) {
  const uint16_t* Q = block.Q;
  const float *bias = block.bias, *x = block.x, *WT = block.WT, *w_norms = block.w_norms, *err_norms = block.err_norms;
  const int64_t rows = block.rows, n = block.n, d = block.d;
  // 1. Screen each row.
  Candidates c;
  const bool finite = collect_candidates(rows, [&](int64_t r, std::vector<int32_t>& cols) {
    thread_local std::vector<float> low, chunk_max, pool;
    low.resize(n + 16);
    return screen_row(Q + r * n, bias, w_norms, err_norms, n, k, row_bound(x + r * d, d), low.data(), chunk_max, pool,
                      cols);
  }, c);
  if (!finite) return -1;
  // 2. Recompute the candidates in float32.
  recompute_candidates(c, x, WT, bias, n, d);
  // 3. Per row, the top-k of the recomputed values (value descending, ties to the lower index).
#pragma omp parallel
  {
    std::vector<Candidate<float>> heap(k);
#pragma omp for schedule(guided)
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t i = 0; i < k; ++i)
        heap[i] = {-std::numeric_limits<float>::infinity(), std::numeric_limits<int64_t>::max()};
      for (int64_t e = c.offsets[r]; e < c.offsets[r + 1]; ++e) {
        const Candidate<float> cand{c.exact[e], int64_t(c.cols[e])};
        if (worse(heap[0], cand)) {
          heap[0] = cand;
          sift_down(heap.data(), k, int64_t(0));
        }
      }
      std::sort(heap.begin(), heap.end(), [](const Candidate<float>& a, const Candidate<float>& b) { return worse(b, a); });
      for (int64_t i = 0; i < k; ++i) {
        values[r * k + i] = heap[i].value > 0.0f ? heap[i].value : 0.0f;
        indices[r * k + i] = heap[i].index;
      }
    }
  }
  return int64_t(c.cols.size());
}

// BatchTopK over the whole block: the m largest of relu(x @ W + bias), ties to the lower flat
// index, in flat order -> values/rows_out/cols_out [m]. The block is the whole batch.
// The m-th largest lower bound over all entries comes from the m-th largest 64-entry chunk
// maximum (a lower bound on it) and the entries at or above that. Returns the candidate count,
// -1 when Q is not finite, or -2 when that bound is not positive (fewer than m entries may be
// positive, and relu's zeros then take part in the selection): the caller takes the float32 path.
inline int64_t batchtopk_screened(const ScreenedBlock& block, int64_t m, float* values, int64_t* rows_out,
                                  int64_t* cols_out) {
  const uint16_t* Q = block.Q;
  const float *bias = block.bias, *x = block.x, *WT = block.WT, *w_norms = block.w_norms, *err_norms = block.err_norms;
  const int64_t rows = block.rows, n = block.n, d = block.d;
  const int64_t n_chunks = (n + kScreenChunk - 1) / kScreenChunk;
  std::vector<RowBound> bounds(rows);
  std::vector<float> chunk_max(rows * n_chunks);
  bool finite = true;
#pragma omp parallel reduction(&& : finite)
  {
    std::vector<float> low(n + 16);
#pragma omp for schedule(guided)
    for (int64_t r = 0; r < rows; ++r) {
      bounds[r] = row_bound(x + r * d, d);
      if (!row_lower_bounds(Q + r * n, bias, w_norms, err_norms, n, bounds[r], low.data(), chunk_max.data() + r * n_chunks))
        finite = false;
    }
  }
  if (!finite) return -1;
  float floor_m = -std::numeric_limits<float>::infinity();
  if (int64_t(chunk_max.size()) >= m) {
    std::vector<float> pool(chunk_max);
    floor_m = mth_largest(pool, m);
  }
  std::vector<std::vector<float>> local(max_threads());
#pragma omp parallel
  {
    std::vector<float> low(n + 16), row_max(n_chunks);
    auto& mine = local[thread_id()];
#pragma omp for schedule(guided)
    for (int64_t r = 0; r < rows; ++r) {
      const float* maxima = chunk_max.data() + r * n_chunks;
      bool any = false;
      for (int64_t c = 0; c < n_chunks && !any; ++c) any = maxima[c] >= floor_m;
      if (!any) continue;
      row_lower_bounds(Q + r * n, bias, w_norms, err_norms, n, bounds[r], low.data(), row_max.data());
      append_at_least(low.data(), maxima, n, floor_m, mine);
    }
  }
  std::vector<float> pool;
  for (auto& part : local) pool.insert(pool.end(), part.begin(), part.end());
  const float mth_low = mth_largest(pool, m);
  if (!(mth_low > 0.0f)) return -2;
  Candidates c;
  collect_candidates(rows, [&](int64_t r, std::vector<int32_t>& cols) {
    row_candidates(Q + r * n, bias, w_norms, err_norms, n, bounds[r], mth_low, cols);
    return true;
  }, c);
  recompute_candidates(c, x, WT, bias, n, d);
  // The m largest exact values (ties to the lower flat index, i.e. the earlier candidate), then
  // emitted in flat order.
  const int64_t total = int64_t(c.cols.size());
  std::vector<int64_t> order(total);
  for (int64_t e = 0; e < total; ++e) order[e] = e;
  std::nth_element(order.begin(), order.begin() + (m - 1), order.end(), [&](int64_t a, int64_t b) {
    return c.exact[a] > c.exact[b] || (c.exact[a] == c.exact[b] && a < b);
  });
  std::vector<char> kept(total, 0);
  for (int64_t i = 0; i < m; ++i) kept[order[i]] = 1;
  int64_t out = 0;
  for (int64_t e = 0; e < total; ++e) {
    if (!kept[e]) continue;
    values[out] = c.exact[e] > 0.0f ? c.exact[e] : 0.0f;
    rows_out[out] = c.rows[e];
    cols_out[out] = c.cols[e];
    ++out;
  }
  return total;
}

// ReLU as a selection: every entry of relu(x @ W + bias) that is positive in float32, as COO in
// row-major order. Candidates are the entries whose upper bound is positive; at most
// max_candidates are gathered (a dense batch stops early). Returns the number of positive entries
// E (values/cols/counts filled: values and cols need room for max_candidates, counts [rows]),
// -1 when Q is not finite, or -3 when more than max_candidates entries may be positive.
inline int64_t relu_screened(const ScreenedBlock& block, int64_t max_candidates, float* values, int64_t* cols_out,
                             int64_t* counts) {
  const uint16_t* Q = block.Q;
  const float *bias = block.bias, *x = block.x, *WT = block.WT, *w_norms = block.w_norms, *err_norms = block.err_norms;
  const int64_t rows = block.rows, n = block.n, d = block.d;
  const float smallest_positive = std::numeric_limits<float>::denorm_min();
  int64_t gathered = 0;
  bool too_many = false;
  Candidates c;
  const bool finite = collect_candidates(rows, [&](int64_t r, std::vector<int32_t>& cols) {
    bool stop;
#pragma omp atomic read
    stop = too_many;
    if (stop) return true;
    thread_local std::vector<float> low, chunk_max;
    low.resize(n + 16);
    chunk_max.resize((n + kScreenChunk - 1) / kScreenChunk);
    const RowBound bound = row_bound(x + r * d, d);
    if (!row_lower_bounds(Q + r * n, bias, w_norms, err_norms, n, bound, low.data(), chunk_max.data())) return false;
    const size_t before = cols.size();
    row_candidates(Q + r * n, bias, w_norms, err_norms, n, bound, smallest_positive, cols);
    int64_t total;
#pragma omp atomic capture
    total = gathered += int64_t(cols.size() - before);
    if (total > max_candidates) {
#pragma omp atomic write
      too_many = true;
    }
    return true;
  }, c);
  if (!finite) return -1;
  if (too_many) return -3;
  recompute_candidates(c, x, WT, bias, n, d);
  int64_t out = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t start = out;
    for (int64_t e = c.offsets[r]; e < c.offsets[r + 1]; ++e) {
      if (!(c.exact[e] > 0.0f)) continue;
      values[out] = c.exact[e];
      cols_out[out] = c.cols[e];
      ++out;
    }
    counts[r] = out - start;
  }
  return out;
}

}  // namespace sparsekit
