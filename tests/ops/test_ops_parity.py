"""The C++ backend computes what reference.py computes: outputs and every gradient."""
import pytest
import torch
from helpers.op_cases import OPS, compare_backends, make_case

SHAPES = [  # (batch, d_in, n, k): ragged sizes, k=1, k=n, one row, one latent
    dict(batch=13, d_in=11, n=29, k=5),
    dict(batch=1, d_in=3, n=7, k=1),
    dict(batch=6, d_in=5, n=9, k=9),
    dict(batch=4, d_in=1, n=1, k=1),
    dict(batch=70, d_in=33, n=130, k=17),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{batch}-d{d_in}-n{n}-k{k}".format(**s))
@pytest.mark.parametrize("op", OPS)
def test_cpp_matches_reference_on_real_values_with_gaps(op, shape, dtype, monkeypatch):
    compare_backends(make_case(op, seed=1, dtype=dtype, **shape), monkeypatch)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{batch}-d{d_in}-n{n}-k{k}".format(**s))
@pytest.mark.parametrize("op", OPS)
def test_cpp_matches_reference_on_exact_integers_with_ties(op, shape, monkeypatch):
    compare_backends(make_case(op, seed=2, integer=True, **shape), monkeypatch)


@pytest.mark.parametrize("op", ["topk_encode", "batchtopk_encode", "relu_encode", "jumprelu_encode",
                                "sparse_decode"])
def test_cpp_matches_reference_on_non_contiguous_inputs(op, monkeypatch):
    compare_backends(make_case(op, seed=3, noncontiguous=True), monkeypatch)


@pytest.mark.parametrize("op", ["sparse_decode", "sparse_decode_coo", "ghost_grad_loss"])
def test_cpp_matches_reference_when_decoder_width_differs(op, monkeypatch):
    compare_backends(make_case(op, seed=4, d_in=6, d_out=10), monkeypatch)


def test_cpp_matches_reference_at_a_wide_dictionary(monkeypatch):
    # Several encoder GEMM tiles (the C++ path splits rows so the scratch block stays ~16 MiB).
    from sparsekit.ops.cpu import encode as cpu_encode
    monkeypatch.setattr(cpu_encode, "TILE_BYTES", 64 * 1024)
    compare_backends(make_case("topk_encode", seed=5, batch=300, d_in=16, n=2048, k=32), monkeypatch)


@pytest.mark.parametrize("op, frozen", [("sparse_decode", "W_dec"), ("sparse_decode", "values"),
                                        ("sparse_decode_coo", "W_dec"), ("topk_encode", "x"),
                                        ("batchtopk_encode", "x"), ("relu_encode", "W_enc"),
                                        ("jumprelu_encode", "log_threshold"), ("ghost_grad_loss", "x")])
def test_cpp_matches_reference_when_only_some_inputs_need_gradients(op, frozen, monkeypatch):
    # Backward formulas skip (or fuse) kernels by ctx.needs_input_grad: each path must agree.
    case = make_case(op, seed=6)
    case.fixed[frozen] = case.leaves.pop(frozen)
    compare_backends(case, monkeypatch)
