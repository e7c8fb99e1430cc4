// The sparse products a sparse dictionary needs, for a sparse matrix S [n_rows, n_cols] given as
// COO entries (values [E], rows [E], cols [E]); duplicates add up. Each output element is summed
// in a fixed order (entries bucketed by a stable sort), so results do not depend on threads.
//
//   coo_times_dense        S @ D (+ bias), D [n_cols, d] -> [n_rows, d] (decode forward)
//   coo_times_dense_t      S @ D^T,  D [d, n_cols]  -> [n_rows, d]   (encoder backward, grad x)
//   coo_t_times_dense      S^T @ D,  D [n_rows, d]  -> [n_cols, d] or its transpose [d, n_cols],
//                          plus the column sums of S               (grad W_dec; grad W_enc, b_enc)
//   sampled_dense_dot      (A @ D^T)[rows[e], cols[e]], A [n_rows, d], D [n_cols, d] -> [E]
//                                                                    (decode backward, grad values)
//   sampled_dot_and_coo_t_times_dense   both of the last two in one pass over D's rows
//                                                                    (decode backward, fused)
#pragma once

#include <algorithm>

#include "common.hpp"

namespace sparsekit {

// Ask for a row of d values ahead of its use: the sparse products gather rows in an order the
// hardware prefetcher cannot guess.
template <typename T>
inline void prefetch_row(const T* row, int64_t d) {
  constexpr int64_t kLine = 64 / sizeof(T);
  for (int64_t i = 0; i < d; i += kLine) __builtin_prefetch(row + i, 0, 3);
}

// Latent (or input-dimension) blocks handled together so that strided writes fill cache lines.
constexpr int64_t kColumnBlock = 16;

// The decode's accumulators: kDecodeVectors vectors of the widest registers this module is built
// for (AVX-512: 16 zmm, 256 floats; AVX2: 8 ymm, 64 floats; SSE2: 8 xmm, 32 floats), held in
// registers while every entry of an output row adds into them, instead of a load and a store of
// the output row per entry. No software prefetch: asking for the gathered rows 1, 2 or 8 entries
// ahead measured no faster than leaving it to the hardware (B=4096, d=512, n=16384, k=32, AVX-512
// EPYC under load), and this loop then matches torch's embedding_bag on the same gathers.
#if defined(__AVX512F__)
constexpr int kDecodeVectors = 16;
#else
constexpr int kDecodeVectors = 8;
#endif

template <typename T>
struct DecodeVector;
template <>
struct DecodeVector<float> {
  typedef float type __attribute__((vector_size(kVectorBytes)));
};
template <>
struct DecodeVector<double> {
  typedef double type __attribute__((vector_size(kVectorBytes)));
};

template <typename V, typename T>
inline V load_vector(const T* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}

// Whether keys[0..n) never decrease (COO entries already in row order: TopK's, BatchTopK's and
// the sparse ReLU's codes arrive so).
inline bool keys_ascending(const int64_t* keys, int64_t n) {
  for (int64_t e = 1; e < n; ++e)
    if (keys[e] < keys[e - 1]) return false;
  return true;
}

// Row r's entries are positions [offsets[r], offsets[r + 1]) of keys, which never decrease.
inline std::vector<int64_t> ascending_offsets(const int64_t* keys, int64_t n_entries, int64_t n_keys) {
  std::vector<int64_t> offsets(n_keys + 1, 0);
  for (int64_t e = 0; e < n_entries; ++e) offsets[keys[e] + 1]++;
  for (int64_t c = 0; c < n_keys; ++c) offsets[c + 1] += offsets[c];
  return offsets;
}

// One output row y [d] = sum over positions p in [begin, end) of values[e] * dense[cols[e]]
// (+ bias), e = order[p] (order null: e = p). Each element is summed from +0 in entry order, one
// multiply-add per entry, then the bias added: the order of the zero-fill + add + separate bias
// pass this replaces, so the bits are the same.
template <typename T>
inline void decode_row(const T* values, const int64_t* cols, const int64_t* order, int64_t begin, int64_t end,
                       const T* dense, int64_t d, const T* bias, T* y) {
  using V = typename DecodeVector<T>::type;
  constexpr int64_t kLanes = kVectorBytes / sizeof(T), kWidth = kLanes * kDecodeVectors;
  auto entry = [order](int64_t p) { return order ? order[p] : p; };
  int64_t i0 = 0;
  for (; i0 + kWidth <= d; i0 += kWidth) {
    V acc[kDecodeVectors];
#pragma GCC unroll 16
    for (int j = 0; j < kDecodeVectors; ++j) acc[j] = V{};
    for (int64_t p = begin; p < end; ++p) {
      const int64_t e = entry(p);
      const T v = values[e];
      const T* w = dense + cols[e] * d + i0;
#pragma GCC unroll 16
      for (int j = 0; j < kDecodeVectors; ++j) acc[j] += v * load_vector<V>(w + j * kLanes);
    }
#pragma GCC unroll 16
    for (int j = 0; j < kDecodeVectors; ++j) {
      V out = acc[j];
      if (bias) out = out + load_vector<V>(bias + i0 + j * kLanes);
      __builtin_memcpy(y + i0 + j * kLanes, &out, sizeof(V));
    }
  }
  if (i0 == d) return;
  const int64_t width = d - i0;  // the last columns, fewer than kWidth
  T acc[kWidth];
  std::fill(acc, acc + width, T(0));
  for (int64_t p = begin; p < end; ++p) {
    const int64_t e = entry(p);
    const T v = values[e];
    const T* w = dense + cols[e] * d + i0;
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) acc[i] += v * w[i];
  }
  for (int64_t i = 0; i < width; ++i) y[i0 + i] = bias ? acc[i] + bias[i0 + i] : acc[i];
}

// out = S @ dense (+ bias on every row; bias may be null). Entries already in row order (rows
// never decrease) are read in place; others are bucketed by row first (a stable sort: the same
// order within each row).
template <typename T>
void coo_times_dense(const T* values, const int64_t* rows, const int64_t* cols, int64_t n_entries,
                     const T* dense, int64_t n_rows, int64_t d, const T* bias, T* out) {
  std::vector<int64_t> offsets;
  Buckets by_row;
  const int64_t* order = nullptr;
  if (keys_ascending(rows, n_entries)) {
    offsets = ascending_offsets(rows, n_entries, n_rows);
  } else {
    by_row = bucket_by_key(rows, n_entries, n_rows);
    offsets = std::move(by_row.offsets);
    order = by_row.order.data();
  }
#pragma omp parallel for schedule(guided)
  for (int64_t r = 0; r < n_rows; ++r)
    decode_row(values, cols, order, offsets[r], offsets[r + 1], dense, d, bias, out + r * d);
}

template <typename T>
void coo_times_dense_t(const T* values, const int64_t* rows, const int64_t* cols, int64_t n_entries,
                       const T* dense, int64_t d, int64_t n_cols, int64_t n_rows, T* out) {
  Buckets by_row = bucket_by_key(rows, n_entries, n_rows);
  const int64_t n_blocks = (d + kColumnBlock - 1) / kColumnBlock;
  // Each thread owns a block of rows of D (a few contiguous rows of n_cols, kept in cache) and
  // writes the matching block of columns of out.
#pragma omp parallel for schedule(guided)
  for (int64_t blk = 0; blk < n_blocks; ++blk) {
    const int64_t i0 = blk * kColumnBlock, width = std::min(kColumnBlock, d - i0);
    for (int64_t r = 0; r < n_rows; ++r) {
      T acc[kColumnBlock] = {};
      for (int64_t p = by_row.offsets[r]; p < by_row.offsets[r + 1]; ++p) {
        const int64_t e = by_row.order[p];
        const T v = values[e];
        const T* w = dense + i0 * n_cols + cols[e];
        for (int64_t ii = 0; ii < width; ++ii) acc[ii] += v * w[ii * n_cols];
      }
      std::copy(acc, acc + width, out + r * d + i0);
    }
  }
}

template <typename T>
void coo_t_times_dense(const T* values, const int64_t* rows, const int64_t* cols, int64_t n_entries,
                       const T* dense, int64_t d, int64_t n_cols, bool transpose_out, T* out,
                       T* col_sums) {
  Buckets by_col = bucket_by_key(cols, n_entries, n_cols);
  const int64_t n_blocks = (n_cols + kColumnBlock - 1) / kColumnBlock;
#pragma omp parallel
  {
    std::vector<T> acc(kColumnBlock * d);
#pragma omp for schedule(guided)
    for (int64_t blk = 0; blk < n_blocks; ++blk) {
      const int64_t c0 = blk * kColumnBlock, width = std::min(kColumnBlock, n_cols - c0);
      std::fill(acc.begin(), acc.end(), T(0));
      for (int64_t cc = 0; cc < width; ++cc) {
        const int64_t c = c0 + cc;
        T* a = acc.data() + cc * d;
        T sum = 0;
        for (int64_t p = by_col.offsets[c]; p < by_col.offsets[c + 1]; ++p) {
          const int64_t e = by_col.order[p];
          if (p + 1 < n_entries) prefetch_row(dense + rows[by_col.order[p + 1]] * d, d);
          const T v = values[e];
          const T* x = dense + rows[e] * d;
          sum += v;
#pragma omp simd
          for (int64_t i = 0; i < d; ++i) a[i] += v * x[i];
        }
        if (col_sums) col_sums[c] = sum;
      }
      if (transpose_out) {
        for (int64_t i = 0; i < d; ++i)
          for (int64_t cc = 0; cc < width; ++cc) out[i * n_cols + c0 + cc] = acc[cc * d + i];
      } else {
        std::copy(acc.begin(), acc.begin() + width * d, out + c0 * d);
      }
    }
  }
}

// u . w over d values (and, when Axpy, acc += v * u in the same pass). The dot is kept in
// kDotChains vector accumulators, each element i added to chain (i / lanes) % kDotChains, the chains
// then summed pairwise and their lanes in order, then the tail: a fixed order, so the bits do not
// depend on threads. One accumulator (what `omp simd reduction` gave) waits out the multiply-add's
// latency on every vector; four chains keep the FMA units busy.
constexpr int kDotChains = 4;

template <typename T, bool Axpy>
inline T dot_and_axpy_row(const T* u, const T* w, T v, T* acc, int64_t d) {
  using V = typename DecodeVector<T>::type;
  constexpr int64_t kLanes = kVectorBytes / sizeof(T), kStep = kLanes * kDotChains;
  V chain[kDotChains];
  for (int j = 0; j < kDotChains; ++j) chain[j] = V{};
  int64_t i = 0;
  for (; i + kStep <= d; i += kStep) {
#pragma GCC unroll 4
    for (int j = 0; j < kDotChains; ++j) {
      const V uj = load_vector<V>(u + i + j * kLanes);
      chain[j] += uj * load_vector<V>(w + i + j * kLanes);
      if constexpr (Axpy) {
        const V out = load_vector<V>(acc + i + j * kLanes) + v * uj;
        __builtin_memcpy(acc + i + j * kLanes, &out, sizeof(V));
      }
    }
  }
  static_assert(kDotChains == 4, "the chains are summed pairwise below");
  const V total = (chain[0] + chain[1]) + (chain[2] + chain[3]);
  T dot = 0;
  for (int64_t l = 0; l < kLanes; ++l) dot += total[l];
  for (; i < d; ++i) {
    dot += u[i] * w[i];
    if constexpr (Axpy) acc[i] += v * u[i];
  }
  return dot;
}

template <typename T>
void sampled_dense_dot(const int64_t* rows, const int64_t* cols, int64_t n_entries, const T* a,
                       const T* dense, int64_t d, T* out) {
#pragma omp parallel for schedule(guided)
  for (int64_t e = 0; e < n_entries; ++e)
    out[e] = dot_and_axpy_row<T, false>(a + rows[e] * d, dense + cols[e] * d, T(0), nullptr, d);
}

// Decode backward in one pass over the latents: for each latent c, its decoder row D[c] stays in
// cache while every entry that uses it reads its gradient row A[r]:
//   dots[e] = A[rows[e]] . D[cols[e]]            (grad values)
//   out[c]  = sum over entries e of c: values[e] * A[rows[e]]   (grad W_dec, fixed order)
template <typename T>
void sampled_dot_and_coo_t_times_dense(const T* values, const int64_t* rows, const int64_t* cols,
                                       int64_t n_entries, const T* a, const T* dense, int64_t d,
                                       int64_t n_cols, T* dots, T* out) {
  Buckets by_col = bucket_by_key(cols, n_entries, n_cols);
#pragma omp parallel for schedule(guided)
  for (int64_t c = 0; c < n_cols; ++c) {
    const T* w = dense + c * d;
    T* acc = out + c * d;
    std::fill(acc, acc + d, T(0));
    for (int64_t p = by_col.offsets[c]; p < by_col.offsets[c + 1]; ++p) {
      const int64_t e = by_col.order[p];
      if (p + 1 < n_entries) prefetch_row(a + rows[by_col.order[p + 1]] * d, d);
      dots[e] = dot_and_axpy_row<T, true>(a + rows[e] * d, w, values[e], acc, d);
    }
  }
}

}  // namespace sparsekit
