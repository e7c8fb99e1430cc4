// pybind11 bindings of sparsekit's CPU kernels: the modules sparsekit._C_<level> (one per ISA level).
//
// Every array argument is taken with .noconvert(): a wrong dtype or a non-contiguous array is a
// TypeError here, never a silent copy. Outputs are preallocated by the caller (sparsekit/ops/cpu/*.py)
// and written in place. Each kernel is bound for float and double.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <stdexcept>
#include <string>

#include "bf16_screen.hpp"
#include "checks.hpp"
#include "cpu_features.hpp"
#include "decoder_rows.hpp"
#include "fma_peak.hpp"
#include "ghost.hpp"
#include "sparse_products.hpp"
#include "topk_select.hpp"

namespace py = pybind11;
using namespace sparsekit;

template <typename T>
using Array = py::array_t<T, py::array::c_style>;
using Index = py::array_t<int64_t, py::array::c_style>;

namespace {

void require(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument(message);
}

template <typename A>
void require_shape(const A& a, const char* name, std::initializer_list<py::ssize_t> shape) {
  require(a.ndim() == py::ssize_t(shape.size()), std::string(name) + " has the wrong rank");
  py::ssize_t axis = 0;
  for (py::ssize_t s : shape) {
    require(a.shape(axis) == s, std::string(name) + " has the wrong size on axis " + std::to_string(axis));
    ++axis;
  }
}

// One branch-free pass (the message is built only on failure: building it per entry cost ~80 ns
// an entry, more than the decode's own work at B=4096, k=32).
void require_in_range(const Index& idx, int64_t upper, const char* name) {
  const int64_t* p = idx.data();
  const py::ssize_t size = idx.size();
  bool outside = false;
  for (py::ssize_t e = 0; e < size; ++e) outside |= static_cast<uint64_t>(p[e]) >= static_cast<uint64_t>(upper);
  if (outside) throw std::invalid_argument(std::string(name) + " holds an index outside [0, " + std::to_string(upper) + ")");
}

// COO entries (rows[e], cols[e]) of an [n_rows, n_cols] matrix: same lengths, indices in range.
// Returns the number of entries.
int64_t require_coo(const Index& rows, const Index& cols, int64_t n_rows, int64_t n_cols) {
  require(rows.ndim() == 1, "rows must be 1-D");
  const int64_t e = rows.shape(0);
  require_shape(cols, "cols", {e});
  require_in_range(rows, n_rows, "rows");
  require_in_range(cols, n_cols, "cols");
  return e;
}

template <typename T>
void topk_select_py(const Array<T>& pre, const Array<T>& bias, int64_t k, Array<T>& values, Index& indices,
                    int threads) {
  require(pre.ndim() == 2, "pre must be 2-D");
  const int64_t rows = pre.shape(0), n = pre.shape(1);
  require(k >= 1 && k <= n, "k must be in [1, n]");
  require_shape(bias, "bias", {n});
  require_shape(values, "values", {rows, k});
  require_shape(indices, "indices", {rows, k});
  const T* p = pre.data();
  const T* b = bias.data();
  T* v = values.mutable_data();
  int64_t* i = indices.mutable_data();
  py::gil_scoped_release release;
  topk_select_block(p, b, rows, n, int64_t(0), k, true, true, v, i, threads, 0);  // the whole row, by a heap
}

template <typename T>
void topk_select_block_py(const Array<T>& pre, const Array<T>& bias, int64_t col0, int64_t k, bool first, bool last,
                          Array<T>& values, Index& indices, int threads, int64_t threshold_min_share) {
  require(pre.ndim() == 2, "pre must be 2-D");
  const int64_t rows = pre.shape(0), width = pre.shape(1);
  require(k >= 1, "k must be >= 1");
  require(col0 >= 0, "col0 must be >= 0");
  require(threshold_min_share >= 0, "threshold_min_share must be >= 0");
  require_shape(bias, "bias", {width});
  require_shape(values, "values", {rows, k});
  require_shape(indices, "indices", {rows, k});
  const T* p = pre.data();
  const T* b = bias.data();
  T* v = values.mutable_data();
  int64_t* i = indices.mutable_data();
  py::gil_scoped_release release;
  topk_select_block(p, b, rows, width, col0, k, first, last, v, i, threads, threshold_min_share);
}

// pre [rows, n] + bias [n] -> (values [E], cols [E], counts [rows]): the positive entries in
// row-major order, E = counts.sum(); None when E > max_entries (nothing is written then).
template <typename T>
py::object relu_compact_py(const Array<T>& pre, const Array<T>& bias, int64_t max_entries, int threads) {
  require(pre.ndim() == 2, "pre must be 2-D");
  const int64_t rows = pre.shape(0), n = pre.shape(1);
  require_shape(bias, "bias", {n});
  const T* p = pre.data();
  const T* b = bias.data();
  Index counts(rows);
  int64_t* c = counts.mutable_data();
  int64_t total;
  {
    py::gil_scoped_release release;
    total = relu_count(p, b, rows, n, c, threads);
  }
  if (total > max_entries) return py::none();
  Array<T> values(total);
  Index cols(total);
  T* v = values.mutable_data();
  int64_t* j = cols.mutable_data();
  {
    py::gil_scoped_release release;
    relu_compact_write(p, b, rows, n, c, v, j, threads);
  }
  return py::make_tuple(values, cols, counts);
}

template <typename T>
void batchtopk_select_py(Array<T>& pre, const Array<T>& bias, int64_t m, Array<T>& values, Index& rows_out,
                         Index& cols_out) {
  require(pre.ndim() == 2, "pre must be 2-D");
  const int64_t rows = pre.shape(0), n = pre.shape(1);
  require(m >= 1 && m <= rows * n, "m must be in [1, rows * n]");
  require_shape(bias, "bias", {n});
  require_shape(values, "values", {m});
  require_shape(rows_out, "rows", {m});
  require_shape(cols_out, "cols", {m});
  T* p = pre.mutable_data();
  const T* b = bias.data();
  T* v = values.mutable_data();
  int64_t* r = rows_out.mutable_data();
  int64_t* c = cols_out.mutable_data();
  py::gil_scoped_release release;
  batchtopk_select(p, b, rows, n, m, v, r, c);
}

template <typename T>
void coo_times_dense_py(const Array<T>& values, const Index& rows, const Index& cols, const Array<T>& dense,
                        Array<T>& out, const std::optional<Array<T>>& bias) {
  require(values.ndim() == 1 && dense.ndim() == 2 && out.ndim() == 2, "values 1-D, dense and out 2-D");
  const int64_t n_cols = dense.shape(0), d = dense.shape(1), n_rows = out.shape(0);
  const int64_t e = require_coo(rows, cols, n_rows, n_cols);
  require_shape(values, "values", {e});
  require_shape(out, "out", {n_rows, d});
  if (bias) require_shape(*bias, "bias", {d});
  const T* b = bias ? bias->data() : nullptr;
  const T* v = values.data();
  const T* w = dense.data();
  T* o = out.mutable_data();
  const int64_t* r = rows.data();
  const int64_t* c = cols.data();
  py::gil_scoped_release release;
  coo_times_dense(v, r, c, e, w, n_rows, d, b, o);
}

template <typename T>
void coo_times_dense_t_py(const Array<T>& values, const Index& rows, const Index& cols, const Array<T>& dense,
                          Array<T>& out) {
  require(values.ndim() == 1 && dense.ndim() == 2 && out.ndim() == 2, "values 1-D, dense and out 2-D");
  const int64_t d = dense.shape(0), n_cols = dense.shape(1), n_rows = out.shape(0);
  const int64_t e = require_coo(rows, cols, n_rows, n_cols);
  require_shape(values, "values", {e});
  require_shape(out, "out", {n_rows, d});
  const T* v = values.data();
  const T* w = dense.data();
  T* o = out.mutable_data();
  const int64_t* r = rows.data();
  const int64_t* c = cols.data();
  py::gil_scoped_release release;
  coo_times_dense_t(v, r, c, e, w, d, n_cols, n_rows, o);
}

template <typename T>
void coo_t_times_dense_py(const Array<T>& values, const Index& rows, const Index& cols, const Array<T>& dense,
                          bool transpose_out, Array<T>& out, Array<T>& col_sums) {
  require(values.ndim() == 1 && dense.ndim() == 2 && out.ndim() == 2, "values 1-D, dense and out 2-D");
  const int64_t n_rows = dense.shape(0), d = dense.shape(1);
  const int64_t n_cols = transpose_out ? out.shape(1) : out.shape(0);
  const int64_t e = require_coo(rows, cols, n_rows, n_cols);
  require_shape(values, "values", {e});
  if (transpose_out) require_shape(out, "out", {d, n_cols});
  else require_shape(out, "out", {n_cols, d});
  require_shape(col_sums, "col_sums", {n_cols});
  const T* v = values.data();
  const T* x = dense.data();
  T* o = out.mutable_data();
  T* s = col_sums.mutable_data();
  const int64_t* r = rows.data();
  const int64_t* c = cols.data();
  py::gil_scoped_release release;
  coo_t_times_dense(v, r, c, e, x, d, n_cols, transpose_out, o, s);
}

template <typename T>
void sampled_dense_dot_py(const Index& rows, const Index& cols, const Array<T>& a, const Array<T>& dense,
                          Array<T>& out) {
  require(a.ndim() == 2 && dense.ndim() == 2, "a and dense must be 2-D");
  const int64_t d = a.shape(1);
  require(dense.shape(1) == d, "a and dense must have the same width");
  const int64_t e = require_coo(rows, cols, a.shape(0), dense.shape(0));
  require_shape(out, "out", {e});
  const int64_t* r = rows.data();
  const int64_t* c = cols.data();
  const T* pa = a.data();
  const T* pd = dense.data();
  T* o = out.mutable_data();
  py::gil_scoped_release release;
  sampled_dense_dot(r, c, e, pa, pd, d, o);
}

template <typename T>
void decode_backward_py(const Array<T>& values, const Index& rows, const Index& cols, const Array<T>& grad_y,
                        const Array<T>& W_dec, Array<T>& grad_values, Array<T>& grad_W_dec) {
  require(values.ndim() == 1 && grad_y.ndim() == 2 && W_dec.ndim() == 2, "values 1-D, grad_y and W_dec 2-D");
  const int64_t n_cols = W_dec.shape(0), d = W_dec.shape(1);
  require(grad_y.shape(1) == d, "grad_y and W_dec must have the same width");
  const int64_t e = require_coo(rows, cols, grad_y.shape(0), n_cols);
  require_shape(values, "values", {e});
  require_shape(grad_values, "grad_values", {e});
  require_shape(grad_W_dec, "grad_W_dec", {n_cols, d});
  const T* v = values.data();
  const T* gy = grad_y.data();
  const T* w = W_dec.data();
  T* gv = grad_values.mutable_data();
  T* gw = grad_W_dec.mutable_data();
  const int64_t* r = rows.data();
  const int64_t* c = cols.data();
  py::gil_scoped_release release;
  sampled_dot_and_coo_t_times_dense(v, r, c, e, gy, w, d, n_cols, gv, gw);
}

template <typename T>
void ghost_rescale_py(Array<T>& ghost, const Array<T>& residual, double eps, Array<T>& scale, Array<T>& row_error) {
  require(ghost.ndim() == 2, "ghost must be 2-D");
  const int64_t rows = ghost.shape(0), d = ghost.shape(1);
  require_shape(residual, "residual", {rows, d});
  require_shape(scale, "scale", {rows});
  require_shape(row_error, "row_error", {rows});
  T* g = ghost.mutable_data();
  const T* r = residual.data();
  T* s = scale.mutable_data();
  T* e = row_error.mutable_data();
  py::gil_scoped_release release;
  ghost_rescale(g, r, rows, d, T(eps), s, e);
}

template <typename T>
void ghost_rescale_backward_py(const Array<T>& ghost, const Array<T>& residual, const Array<T>& scale,
                               double coefficient, Array<T>& grad_ghost) {
  require(ghost.ndim() == 2, "ghost must be 2-D");
  const int64_t rows = ghost.shape(0), d = ghost.shape(1);
  require_shape(residual, "residual", {rows, d});
  require_shape(scale, "scale", {rows});
  require_shape(grad_ghost, "grad_ghost", {rows, d});
  const T* g = ghost.data();
  const T* r = residual.data();
  const T* s = scale.data();
  T* out = grad_ghost.mutable_data();
  py::gil_scoped_release release;
  ghost_rescale_backward(g, r, s, rows, d, T(coefficient), out);
}

template <typename T>
void remove_parallel_rows_py(const Array<T>& W, Array<T>& grad) {
  require(W.ndim() == 2, "W must be 2-D");
  const int64_t n = W.shape(0), d = W.shape(1);
  require_shape(grad, "grad", {n, d});
  const T* w = W.data();
  T* g = grad.mutable_data();
  py::gil_scoped_release release;
  remove_parallel_rows(w, g, n, d);
}

template <typename T>
void normalize_rows_py(Array<T>& W) {
  require(W.ndim() == 2, "W must be 2-D");
  const int64_t n = W.shape(0), d = W.shape(1);
  T* w = W.mutable_data();
  py::gil_scoped_release release;
  normalize_rows(w, n, d);
}

template <typename T>
bool all_finite_py(const Array<T>& a) {
  const T* p = a.data();
  const int64_t size = a.size();
  py::gil_scoped_release release;
  return all_finite(p, size);
}

// bfloat16 arrays cross as int16 (NumPy has no bfloat16): the bit patterns, reinterpreted here.
using Bf16Bits = py::array_t<int16_t, py::array::c_style>;

inline uint16_t* bf16_bits(Bf16Bits& a) { return reinterpret_cast<uint16_t*>(a.mutable_data()); }
inline const uint16_t* bf16_bits(const Bf16Bits& a) { return reinterpret_cast<const uint16_t*>(a.data()); }

void pack_bf16_py(const Array<float>& src, Bf16Bits& dst) {
  require(dst.size() == src.size(), "dst must have src's size");
  const float* s = src.data();
  uint16_t* o = bf16_bits(dst);
  const int64_t size = src.size();
  py::gil_scoped_release release;
  pack_bf16(s, size, o);
}

void pack_encoder_bf16_py(const Array<float>& W, Bf16Bits& Wb, Array<float>& WT, Array<float>& w_norms,
                          Array<float>& err_norms) {
  require(W.ndim() == 2, "W must be 2-D");
  const int64_t d = W.shape(0), n = W.shape(1);
  require_shape(Wb, "Wb", {d, n});
  require_shape(WT, "WT", {n, d});
  require_shape(w_norms, "w_norms", {n});
  require_shape(err_norms, "err_norms", {n});
  const float* w = W.data();
  uint16_t* wb = bf16_bits(Wb);
  float* wt = WT.mutable_data();
  float *wn = w_norms.mutable_data(), *en = err_norms.mutable_data();
  py::gil_scoped_release release;
  pack_encoder_bf16(w, d, n, wb, wt, wn, en);
}

// The arrays every screened kernel reads, checked against each other: Q [rows, n] (bf16 bits),
// bias [n], x [rows, d], WT [n, d], w_norms and err_norms [n].
ScreenedBlock screened_block(const Bf16Bits& Q, const Array<float>& bias, const Array<float>& x, const Array<float>& WT,
                             const Array<float>& w_norms, const Array<float>& err_norms) {
  require(Q.ndim() == 2 && x.ndim() == 2 && WT.ndim() == 2, "Q, x and WT must be 2-D");
  const int64_t rows = Q.shape(0), n = Q.shape(1), d = x.shape(1);
  require_shape(bias, "bias", {n});
  require_shape(x, "x", {rows, d});
  require_shape(WT, "WT", {n, d});
  require_shape(w_norms, "w_norms", {n});
  require_shape(err_norms, "err_norms", {n});
  return {bf16_bits(Q), bias.data(), x.data(), WT.data(), w_norms.data(), err_norms.data(), rows, n, d};
}

int64_t topk_screened_py(const Bf16Bits& Q, const Array<float>& bias, const Array<float>& x, const Array<float>& WT,
                         const Array<float>& w_norms, const Array<float>& err_norms, int64_t k, Array<float>& values,
                         Index& indices) {
  const ScreenedBlock block = screened_block(Q, bias, x, WT, w_norms, err_norms);
  require(k >= 1 && k <= block.n, "k must be in [1, n]");
  require_shape(values, "values", {block.rows, k});
  require_shape(indices, "indices", {block.rows, k});
  float* v = values.mutable_data();
  int64_t* i = indices.mutable_data();
  py::gil_scoped_release release;
  return topk_screened(block, k, v, i);
}

int64_t batchtopk_screened_py(const Bf16Bits& Q, const Array<float>& bias, const Array<float>& x,
                              const Array<float>& WT, const Array<float>& w_norms, const Array<float>& err_norms,
                              int64_t m, Array<float>& values, Index& rows_out, Index& cols_out) {
  const ScreenedBlock block = screened_block(Q, bias, x, WT, w_norms, err_norms);
  require(m >= 1 && m <= block.rows * block.n, "m must be in [1, rows * n]");
  require_shape(values, "values", {m});
  require_shape(rows_out, "rows", {m});
  require_shape(cols_out, "cols", {m});
  float* v = values.mutable_data();
  int64_t *r = rows_out.mutable_data(), *c = cols_out.mutable_data();
  py::gil_scoped_release release;
  return batchtopk_screened(block, m, v, r, c);
}

// -> (values [E], cols [E], counts [rows]) of the positive entries, or None when more than
// max_candidates may be positive or Q is not finite (the caller takes the float32 path).
py::object relu_screened_py(const Bf16Bits& Q, const Array<float>& bias, const Array<float>& x,
                            const Array<float>& WT, const Array<float>& w_norms, const Array<float>& err_norms,
                            int64_t max_candidates) {
  const ScreenedBlock block = screened_block(Q, bias, x, WT, w_norms, err_norms);
  require(max_candidates >= 0, "max_candidates must be >= 0");
  Array<float> values(max_candidates);
  Index cols(max_candidates), counts(block.rows);
  float* v = values.mutable_data();
  int64_t *c = cols.mutable_data(), *k = counts.mutable_data();
  int64_t found;
  {
    py::gil_scoped_release release;
    found = relu_screened(block, max_candidates, v, c, k);
  }
  if (found < 0) return py::none();
  return py::make_tuple(values[py::slice(0, found, 1)], cols[py::slice(0, found, 1)], counts);
}

void bind_bf16_screen(py::module_& m) {
  m.def("pack_bf16", &pack_bf16_py, py::arg("src").noconvert(), py::arg("dst").noconvert(),
        "dst = src rounded to bfloat16 (nearest, ties to even), as int16 bit patterns.");
  m.def("pack_encoder_bf16", &pack_encoder_bf16_py, py::arg("W").noconvert(), py::arg("Wb").noconvert(),
        py::arg("WT").noconvert(), py::arg("w_norms").noconvert(), py::arg("err_norms").noconvert(),
        "One pass over W [d, n]: its bfloat16 bits Wb [d, n], its transpose WT [n, d], and per column the norms "
        "of the rounded column and of its rounding error [n].");
  m.def("topk_screened", &topk_screened_py, py::arg("Q").noconvert(), py::arg("bias").noconvert(),
        py::arg("x").noconvert(), py::arg("WT").noconvert(), py::arg("w_norms").noconvert(),
        py::arg("err_norms").noconvert(), py::arg("k"),
        py::arg("values").noconvert(), py::arg("indices").noconvert(),
        "Exact float32 top-k of x @ W + bias (ReLU'd, sorted) from the bfloat16 GEMM Q [rows, n]: screen by the "
        "rounding bound, recompute the candidates. Returns the candidate count, or -1 when Q is not finite.");
  m.def("batchtopk_screened", &batchtopk_screened_py, py::arg("Q").noconvert(), py::arg("bias").noconvert(),
        py::arg("x").noconvert(), py::arg("WT").noconvert(), py::arg("w_norms").noconvert(),
        py::arg("err_norms").noconvert(), py::arg("m"), py::arg("values").noconvert(), py::arg("rows").noconvert(),
        py::arg("cols").noconvert(),
        "BatchTopK from the bfloat16 GEMM Q [rows, n]: the m largest of relu(x @ W + bias) in flat order (ties: "
        "lower flat index), exact float32. Returns the candidate count, -1 when Q is not finite, -2 when fewer "
        "than m entries may be positive (take the float32 path).");
  m.def("relu_screened", &relu_screened_py, py::arg("Q").noconvert(), py::arg("bias").noconvert(),
        py::arg("x").noconvert(), py::arg("WT").noconvert(), py::arg("w_norms").noconvert(),
        py::arg("err_norms").noconvert(), py::arg("max_candidates"),
        "The positive entries of relu(x @ W + bias) from the bfloat16 GEMM Q [rows, n], exact float32, as "
        "(values, cols, counts per row) in row-major order; None when more than max_candidates may be positive "
        "or Q is not finite.");
}

template <typename T>
void bind_all(py::module_& m) {
  m.def("decode_backward", &decode_backward_py<T>, py::arg("values").noconvert(), py::arg("rows").noconvert(),
        py::arg("cols").noconvert(), py::arg("grad_y").noconvert(), py::arg("W_dec").noconvert(),
        py::arg("grad_values").noconvert(), py::arg("grad_W_dec").noconvert(),
        "Sparse decode backward in one pass over the latents: grad values and grad W_dec.");
  m.def("ghost_rescale", &ghost_rescale_py<T>, py::arg("ghost").noconvert(), py::arg("residual").noconvert(),
        py::arg("eps"), py::arg("scale").noconvert(), py::arg("row_error").noconvert(),
        "Ghost grads: rescale each ghost row to half the residual's norm; per-row squared error.");
  m.def("ghost_rescale_backward", &ghost_rescale_backward_py<T>, py::arg("ghost").noconvert(),
        py::arg("residual").noconvert(), py::arg("scale").noconvert(), py::arg("coefficient"),
        py::arg("grad_ghost").noconvert(), "Ghost grads: gradient through the rescale, scale held constant.");
  m.def("remove_parallel_rows", &remove_parallel_rows_py<T>, py::arg("W").noconvert(), py::arg("grad").noconvert(),
        "In place: each row of grad [n, d] loses its component along the same row of W [n, d].");
  m.def("normalize_rows", &normalize_rows_py<T>, py::arg("W").noconvert(),
        "In place: each row of W [n, d] divided by max(its norm, 1e-12).");
  m.def("all_finite", &all_finite_py<T>, py::arg("a").noconvert(), "True when a holds no NaN or Inf.");
  m.def("topk_select", &topk_select_py<T>, py::arg("pre").noconvert(), py::arg("bias").noconvert(), py::arg("k"),
        py::arg("values").noconvert(), py::arg("indices").noconvert(), py::arg("threads") = 0,
        "Per row of pre + bias [rows, n]: the k largest (ties: lower index), ReLU'd, sorted descending.");
  m.def("topk_select_block", &topk_select_block_py<T>, py::arg("pre").noconvert(), py::arg("bias").noconvert(),
        py::arg("col0"), py::arg("k"), py::arg("first"), py::arg("last"), py::arg("values").noconvert(),
        py::arg("indices").noconvert(), py::arg("threads"), py::arg("threshold_min_share"),
        "topk_select over column blocks fed in order: values/indices carry the candidates between calls "
        "and hold the sorted, ReLU'd top-k after the last block. A whole row (first and last) with "
        "k * threshold_min_share >= its width is selected by threshold (nth_element) instead of a heap, "
        "with the same result; 0: always the heap.");
  m.def("relu_compact", &relu_compact_py<T>, py::arg("pre").noconvert(), py::arg("bias").noconvert(),
        py::arg("max_entries"), py::arg("threads") = 0,
        "The positive entries of pre + bias [rows, n] in row-major order: (values, cols, counts per row), "
        "or None when there are more than max_entries.");
  m.def("batchtopk_select", &batchtopk_select_py<T>, py::arg("pre").noconvert(), py::arg("bias").noconvert(),
        py::arg("m"), py::arg("values").noconvert(), py::arg("rows").noconvert(), py::arg("cols").noconvert(),
        "The m largest of relu(pre + bias) over the whole block, in flat order; pre is overwritten.");
  m.def("coo_times_dense", &coo_times_dense_py<T>, py::arg("values").noconvert(), py::arg("rows").noconvert(),
        py::arg("cols").noconvert(), py::arg("dense").noconvert(), py::arg("out").noconvert(),
        py::arg("bias").noconvert() = py::none(),
        "out = S @ dense (+ bias [dense cols] on every row), S the COO matrix [out rows, dense rows]; entries "
        "in row order are read in place, others bucketed by row (stable).");
  m.def("coo_times_dense_t", &coo_times_dense_t_py<T>, py::arg("values").noconvert(), py::arg("rows").noconvert(),
        py::arg("cols").noconvert(), py::arg("dense").noconvert(), py::arg("out").noconvert(),
        "out = S @ dense.T, S the COO matrix [out rows, dense cols].");
  m.def("coo_t_times_dense", &coo_t_times_dense_py<T>, py::arg("values").noconvert(), py::arg("rows").noconvert(),
        py::arg("cols").noconvert(), py::arg("dense").noconvert(), py::arg("transpose_out"),
        py::arg("out").noconvert(), py::arg("col_sums").noconvert(),
        "out = S.T @ dense (or its transpose) and col_sums = S.T @ 1, summed in a fixed order.");
  m.def("sampled_dense_dot", &sampled_dense_dot_py<T>, py::arg("rows").noconvert(), py::arg("cols").noconvert(),
        py::arg("a").noconvert(), py::arg("dense").noconvert(), py::arg("out").noconvert(),
        "out[e] = a[rows[e]] . dense[cols[e]].");
}

}  // namespace

// One module per instruction-set level, each built from this file (CMakeLists.txt names it:
// _C_avx512, _C_avx2, _C_baseline); sparsekit/ops/cpu/isa.py imports the best one the CPU runs.
#ifndef SPARSEKIT_MODULE
#define SPARSEKIT_MODULE _C_baseline
#endif

PYBIND11_MODULE(SPARSEKIT_MODULE, m) {
  m.doc() = "sparsekit's CPU kernels (C++17, OpenMP). Called through sparsekit.ops, not directly.";
  m.def("cpu_isa_levels", &cpu_isa_levels, "The instruction-set levels this CPU supports, best first.");
  m.attr("isa") = compiled_isa();
  bind_all<float>(m);
  bind_all<double>(m);
  bind_bf16_screen(m);
  m.def("fma_peak_flops", [](int64_t rounds) {
    require(rounds >= 1, "rounds must be >= 1");
    float sink = 0.0f;
    double flops;
    {
      py::gil_scoped_release release;
      flops = fma_peak_flops(rounds, &sink);
    }
    return py::make_tuple(flops, sink);
  }, py::arg("rounds"), "float32 FLOPs of `rounds` rounds of register-only vector FMAs on every thread, "
     "and a value that depends on them: (flops, sink). Time it for this CPU's FMA rate.");
  m.def("get_num_threads", &max_threads, "OpenMP threads the kernels use.");
  m.def("set_num_threads", [](int n) {
    require(n >= 1, "n must be >= 1");
#ifdef _OPENMP
    omp_set_num_threads(n);
#endif
  }, py::arg("n"), "Set the OpenMP threads the kernels use.");
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
