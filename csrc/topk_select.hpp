// Top-k selection fused with the bias add and ReLU: the epilogue of the encoder GEMM.
//
// topk_select_block: per row, the k largest of pre[r] + bias (ties: lower index), ReLU applied,
//                   sorted by value descending (ties: lower index first); the row may come in
//                   column blocks (a whole row is one block).
// batchtopk_select: over the whole [R, n] block, the M largest of relu(pre + bias)
//                   (ties: lower flat index), returned in flat (row-major) order.
#pragma once

#include <algorithm>
#include <cstring>
#include <functional>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.hpp"

namespace sparsekit {

// A candidate is worse than another when its value is smaller, or equal with a larger index.
template <typename T>
struct Candidate {
  T value;
  int64_t index;
};

template <typename T>
inline bool worse(const Candidate<T>& a, const Candidate<T>& b) {
  return a.value < b.value || (a.value == b.value && a.index > b.index);
}

// Min-heap on "worse": heap[0] is the worst kept candidate.
template <typename T>
inline void sift_down(Candidate<T>* heap, int64_t size, int64_t pos) {
  while (true) {
    int64_t left = 2 * pos + 1, right = left + 1, worst = pos;
    if (left < size && worse(heap[left], heap[worst])) worst = left;
    if (right < size && worse(heap[right], heap[worst])) worst = right;
    if (worst == pos) return;
    std::swap(heap[pos], heap[worst]);
    pos = worst;
  }
}

// ReLU as a selection: the positive entries of pre[r] + bias, in column order (a ReLU encoder's
// codes as COO when they are sparse). Two passes over the block: count per row, then write.
// counts [rows]; relu_compact_write fills values/cols from offsets[r] = sum of earlier counts.
template <typename T>
int64_t relu_count(const T* pre, const T* bias, int64_t rows, int64_t n, int64_t* counts, int threads) {
  int64_t total = 0;
#pragma omp parallel for schedule(guided) reduction(+ : total) num_threads(threads > 0 ? threads : max_threads())
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = pre + r * n;
    int64_t c = 0;
#pragma omp simd reduction(+ : c)
    for (int64_t j = 0; j < n; ++j) c += (row[j] + bias[j] > T(0));
    counts[r] = c;
    total += c;
  }
  return total;
}

template <typename T>
void relu_compact_write(const T* pre, const T* bias, int64_t rows, int64_t n, const int64_t* counts,
                        T* values, int64_t* cols, int threads) {
  std::vector<int64_t> offsets(rows + 1, 0);
  for (int64_t r = 0; r < rows; ++r) offsets[r + 1] = offsets[r] + counts[r];
#pragma omp parallel for schedule(guided) num_threads(threads > 0 ? threads : max_threads())
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = pre + r * n;
    int64_t out = offsets[r];
    if (counts[r] == 0) continue;
    for (int64_t j = 0; j < n; ++j) {
      const T v = row[j] + bias[j];
      if (v > T(0)) {
        values[out] = v;
        cols[out] = j;
        ++out;
      }
    }
  }
}

// The same selection over a row block fed in column blocks, so each [rows, width] block of the
// GEMM is selected from while it is still in L2 (the whole row costs ~3x more to re-read from L3
// or DRAM). values/indices [rows, k] carry each row's candidates between calls (a heap, unsorted)
// and get the final sorted, ReLU'd result on the last block. Blocks must come in column order:
// later columns then enter only on a strictly larger value, which keeps ties on the lower index.
template <typename T>
void topk_select_block_row(const T* pre, const T* bias, int64_t width, int64_t col0, int64_t k, bool first,
                           bool last, Candidate<T>* heap, T* values_io, int64_t* indices_io) {
  if (first) {
    for (int64_t i = 0; i < k; ++i) heap[i] = {-std::numeric_limits<T>::infinity(), std::numeric_limits<int64_t>::max()};
  } else {
    for (int64_t i = 0; i < k; ++i) heap[i] = {values_io[i], indices_io[i]};
  }
  T threshold = heap[0].value;
  constexpr int64_t kBlock = 64;
  int64_t i = 0;
  for (; i + kBlock <= width; i += kBlock) {
    int hit = 0;
#pragma omp simd reduction(| : hit)
    for (int64_t j = 0; j < kBlock; ++j) hit |= (pre[i + j] + bias[i + j] > threshold);
    if (!hit) continue;
    for (int64_t j = i; j < i + kBlock; ++j) {
      T v = pre[j] + bias[j];
      if (v > threshold) {
        heap[0] = {v, col0 + j};
        sift_down(heap, k, int64_t(0));
        threshold = heap[0].value;
      }
    }
  }
  for (; i < width; ++i) {
    T v = pre[i] + bias[i];
    if (v > threshold) {
      heap[0] = {v, col0 + i};
      sift_down(heap, k, int64_t(0));
      threshold = heap[0].value;
    }
  }
  if (last) {
    std::sort(heap, heap + k, [](const Candidate<T>& a, const Candidate<T>& b) { return worse(b, a); });
    for (int64_t j = 0; j < k; ++j) {
      values_io[j] = heap[j].value > T(0) ? heap[j].value : T(0);
      indices_io[j] = heap[j].index;
    }
  } else {
    for (int64_t j = 0; j < k; ++j) {
      values_io[j] = heap[j].value;
      indices_io[j] = heap[j].index;
    }
  }
}

// The same result for a whole row in one block when k is a large share of it, where the heap
// takes most entries in (a heap of 256 over 1,638 columns: ~730 insertions of log2(256) levels
// each). Instead, by threshold: a lower bound t on the k-th best value from a fixed sample (every
// kSampleStride-th entry; its rank chosen so that ~1.5 k + 16 entries are expected at or above t),
// the entries >= t collected in column order (branch-free), the k-th best among them by
// std::nth_element, then the entries above it and the first entries equal to it in column order
// (ties: lower index), sorted. Exact whatever the sample: when fewer than k entries reach t, t is
// dropped and every entry is a candidate. Selects what the heap does: the k best by (value
// descending, index ascending) among entries > -inf (NaN and -inf never enter the heap either);
// returns false, writing nothing, when fewer than k entries qualify (the heap then keeps its
// sentinels, and the caller runs it).
constexpr int64_t kSampleStride = 8;

template <typename T>
struct ThresholdScratch {
  std::vector<T> sample, values;
  std::vector<int64_t> columns;
  std::vector<Candidate<T>> kept, sorted;
  std::vector<uint64_t> keys, keys_out;
};

// kept (in column order, no NaN) sorted into out by (value descending, index ascending): for float,
// a stable LSD radix sort on an order-preserving key of the value (-0 read as +0, which compares
// equal to it), so equal values keep their column order; 4 passes of 8 bits instead of a comparison
// sort whose branches mispredict on every other step (~2k comparisons for k = 256: most of the
// row's time). Other types: std::sort with the heap's order.
template <typename T>
void sort_kept(const std::vector<Candidate<T>>& kept, ThresholdScratch<T>& s, std::vector<Candidate<T>>& out) {
  const size_t n = kept.size();
  out.resize(n);
  if constexpr (sizeof(T) == 4 && std::numeric_limits<T>::is_iec559) {
    s.keys.resize(n);
    s.keys_out.resize(n);
    for (size_t i = 0; i < n; ++i) {
      uint32_t b;
      std::memcpy(&b, &kept[i].value, 4);
      if (b == 0x80000000u) b = 0;  // -0 -> +0
      b = (b & 0x80000000u) ? ~b : (b | 0x80000000u);  // ascending in the value
      s.keys[i] = (uint64_t(~b) << 32) | uint64_t(i);  // ascending key = descending v; low half: position
    }
    for (int shift = 32; shift < 64; shift += 8) {
      size_t counts[257] = {0};
      for (size_t i = 0; i < n; ++i) ++counts[((s.keys[i] >> shift) & 0xFF) + 1];
      for (int b = 0; b < 256; ++b) counts[b + 1] += counts[b];
      for (size_t i = 0; i < n; ++i) s.keys_out[counts[(s.keys[i] >> shift) & 0xFF]++] = s.keys[i];
      s.keys.swap(s.keys_out);
    }
    for (size_t i = 0; i < n; ++i) out[i] = kept[s.keys[i] & 0xFFFFFFFFu];
  } else {
    out.assign(kept.begin(), kept.end());
    std::sort(out.begin(), out.end(), [](const Candidate<T>& a, const Candidate<T>& b) { return worse(b, a); });
  }
}

template <typename T>
bool topk_select_row_by_threshold(const T* pre, const T* bias, int64_t width, int64_t col0, int64_t k,
                                  ThresholdScratch<T>& s, T* values_out, int64_t* indices_out) {
  const T floor = -std::numeric_limits<T>::infinity();
  T bound = floor;  // candidates: entries > floor and >= bound
  s.sample.clear();
  for (int64_t j = 0; j < width; j += kSampleStride) {
    const T v = pre[j] + bias[j];
    if (v > floor) s.sample.push_back(v);
  }
  const int64_t rank = int64_t(double(k) * 1.5 * double(s.sample.size()) / double(width)) + 2;
  if (rank <= int64_t(s.sample.size())) {
    std::nth_element(s.sample.begin(), s.sample.begin() + (rank - 1), s.sample.end(), std::greater<T>());
    bound = s.sample[rank - 1];
  }
  s.values.resize(width);
  s.columns.resize(width);
  int64_t count = 0;
  for (int pass = 0; pass < 2; ++pass) {
    count = 0;
    for (int64_t j = 0; j < width; ++j) {
      const T v = pre[j] + bias[j];
      s.values[count] = v;
      s.columns[count] = j;
      count += (v > floor) & (v >= bound);
    }
    if (count >= k || bound == floor) break;
    bound = floor;  // the sample's bound was too high: every entry is a candidate
  }
  if (count < k) return false;
  s.sample.assign(s.values.begin(), s.values.begin() + count);
  std::nth_element(s.sample.begin(), s.sample.begin() + (k - 1), s.sample.end(), std::greater<T>());
  const T kth = s.sample[k - 1];
  int64_t above = 0;
  for (int64_t c = 0; c < count; ++c) above += s.values[c] > kth;
  int64_t ties = k - above;  // entries equal to kth to keep, the lowest columns first
  s.kept.clear();
  for (int64_t c = 0; c < count; ++c) {
    const T v = s.values[c];
    if (v > kth || (v == kth && ties-- > 0)) s.kept.push_back({v, col0 + s.columns[c]});
  }
  sort_kept(s.kept, s, s.sorted);
  for (int64_t j = 0; j < k; ++j) {
    values_out[j] = s.sorted[j].value > T(0) ? s.sorted[j].value : T(0);
    indices_out[j] = s.sorted[j].index;
  }
  return true;
}

// pre [rows, width]: columns [col0, col0 + width) of the rows' pre-activations (no bias); bias
// [width] (the same columns); values/indices [rows, k] carried across the calls of one row block.
// A whole row (first and last) with k * threshold_min_share >= width goes through
// topk_select_row_by_threshold (0: always the heap). The value comes from the Python callers:
// sparsekit.ops.cpu.encode.THRESHOLD_SELECT_MIN_SHARE (measurements there), or what `sparsekit tune`
// measured on the machine at hand.
template <typename T>
void topk_select_block(const T* pre, const T* bias, int64_t rows, int64_t width, int64_t col0, int64_t k,
                       bool first, bool last, T* values, int64_t* indices, int threads, int64_t threshold_min_share) {
  const bool by_threshold = first && last && k <= width && threshold_min_share > 0 && k * threshold_min_share >= width;
#pragma omp parallel num_threads(threads > 0 ? threads : max_threads())
  {
    std::vector<Candidate<T>> heap(k);
    ThresholdScratch<T> scratch;
#pragma omp for schedule(guided)
    for (int64_t r = 0; r < rows; ++r) {
      if (by_threshold && topk_select_row_by_threshold(pre + r * width, bias, width, col0, k, scratch,
                                                       values + r * k, indices + r * k))
        continue;
      topk_select_block_row(pre + r * width, bias, width, col0, k, first, last, heap.data(), values + r * k,
                            indices + r * k);
    }
  }
}

// Non-negative IEEE floats order like their bit patterns read as unsigned integers.
template <typename T>
using bits_t = typename std::conditional<sizeof(T) == 4, uint32_t, uint64_t>::type;

template <typename T>
inline bits_t<T> to_bits(T v) {
  bits_t<T> b;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}

// acts [size] holds relu(pre + bias), all >= +0. Returns the bit pattern of the m-th largest
// (1-based) by radix selection, 16 bits per pass, each pass restricted to the prefix found so far.
template <typename T>
bits_t<T> radix_select_bits(const T* acts, int64_t size, int64_t m) {
  using U = bits_t<T>;
  constexpr int kDigitBits = 16;
  constexpr int64_t kBins = int64_t(1) << kDigitBits;
  constexpr int kTotalBits = int(sizeof(U) * 8);
  U prefix = 0;
  int64_t remaining = m;  // rank still to find within the current prefix
  const int threads = max_threads();
  std::vector<int64_t> hist(kBins * threads);
  for (int shift = kTotalBits - kDigitBits; shift >= 0; shift -= kDigitBits) {
    std::fill(hist.begin(), hist.end(), 0);
    const int high_shift = shift + kDigitBits;
    const U high_prefix = high_shift >= kTotalBits ? U(0) : (prefix >> high_shift);
#pragma omp parallel
    {
      int64_t* local = hist.data() + int64_t(thread_id()) * kBins;
#pragma omp for schedule(guided)
      for (int64_t i = 0; i < size; ++i) {
        U b = to_bits(acts[i]);
        bool in_prefix = high_shift >= kTotalBits || (b >> high_shift) == high_prefix;
        if (in_prefix) local[(b >> shift) & (kBins - 1)]++;
      }
    }
    int64_t digit = kBins - 1;
    for (; digit >= 0; --digit) {
      int64_t count = 0;
      for (int t = 0; t < threads; ++t) count += hist[int64_t(t) * kBins + digit];
      if (count >= remaining) break;
      remaining -= count;
    }
    prefix |= U(digit) << shift;
  }
  return prefix;
}

// pre [rows, n] (overwritten with relu(pre + bias)), bias [n], m in [1, rows * n]
// -> values [m], out_rows [m], out_cols [m] in flat order.
template <typename T>
void batchtopk_select(T* pre, const T* bias, int64_t rows, int64_t n, int64_t m, T* values,
                      int64_t* out_rows, int64_t* out_cols) {
  const int64_t size = rows * n;
#pragma omp parallel for schedule(guided)
  for (int64_t r = 0; r < rows; ++r) {
    T* row = pre + r * n;
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) {
      T v = row[c] + bias[c];
      row[c] = v > T(0) ? v : T(0);
    }
  }
  const bits_t<T> threshold = radix_select_bits(pre, size, m);

  // Per row: how many entries beat the threshold and how many equal it. Ties are granted to
  // rows in flat order, which keeps the lower flat index.
  std::vector<int64_t> above(rows), equal(rows);
#pragma omp parallel for schedule(guided)
  for (int64_t r = 0; r < rows; ++r) {
    int64_t a = 0, e = 0;
    const T* row = pre + r * n;
    for (int64_t c = 0; c < n; ++c) {
      bits_t<T> b = to_bits(row[c]);
      a += b > threshold;
      e += b == threshold;
    }
    above[r] = a;
    equal[r] = e;
  }
  int64_t total_above = 0;
  for (int64_t r = 0; r < rows; ++r) total_above += above[r];
  int64_t ties_left = m - total_above;
  std::vector<int64_t> start(rows), ties(rows);
  int64_t cursor = 0;
  for (int64_t r = 0; r < rows; ++r) {
    ties[r] = std::min(equal[r], ties_left);
    ties_left -= ties[r];
    start[r] = cursor;
    cursor += above[r] + ties[r];
  }
#pragma omp parallel for schedule(guided)
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = pre + r * n;
    int64_t out = start[r], ties_here = ties[r];
    if (above[r] + ties_here == 0) continue;
    for (int64_t c = 0; c < n; ++c) {
      bits_t<T> b = to_bits(row[c]);
      bool keep = b > threshold || (b == threshold && ties_here > 0);
      if (!keep) continue;
      if (b == threshold) --ties_here;
      values[out] = row[c];
      out_rows[out] = r;
      out_cols[out] = c;
      ++out;
    }
  }
}

}  // namespace sparsekit
