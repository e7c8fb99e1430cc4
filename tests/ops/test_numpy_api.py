"""sparsekit.numpy: the ops on NumPy arrays reach the C++ kernels as views (no copy in or out),
give exactly what the torch ops give, and DLPack arrays (JAX) pass both ways without copies."""
import warnings

import numpy as np
import pytest
import torch

import sparsekit
import sparsekit.numpy as snp
from sparsekit import ops


@pytest.fixture(autouse=True)
def default_backend(monkeypatch):
    monkeypatch.delenv("SPARSEKIT_BACKEND", raising=False)


def arrays(dtype=np.float32, seed=0, batch=20, d=12, n=40):
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((batch, d)).astype(dtype), "W_enc": rng.standard_normal((d, n)).astype(dtype),
            "b_enc": (0.1 * rng.standard_normal(n)).astype(dtype), "W_dec": rng.standard_normal((n, d)).astype(dtype),
            "b_dec": rng.standard_normal(d).astype(dtype), "log_threshold": rng.uniform(-2, 0, n).astype(dtype)}


def tensors(a):
    return {name: torch.from_numpy(v.copy()) for name, v in a.items()}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_forward_ops_equal_the_torch_ops(dtype):
    a = arrays(dtype)
    t = tensors(a)
    codes = snp.topk_encode(a["x"], a["W_enc"], a["b_enc"], k=5)
    expected = sparsekit.topk_encode(t["x"], t["W_enc"], t["b_enc"], 5)
    assert isinstance(codes.values, np.ndarray) and codes.values.dtype == dtype and codes.indices.dtype == np.int64
    np.testing.assert_array_equal(codes.values, expected.values.numpy())
    np.testing.assert_array_equal(codes.indices, expected.indices.numpy())

    batch = snp.batchtopk_encode(a["x"], a["W_enc"], a["b_enc"], k=5)
    for got, want in zip(batch, sparsekit.batchtopk_encode(t["x"], t["W_enc"], t["b_enc"], 5)):
        np.testing.assert_array_equal(got, want.numpy())
    np.testing.assert_array_equal(snp.relu_encode(a["x"], a["W_enc"], a["b_enc"]),
                                  sparsekit.relu_encode(t["x"], t["W_enc"], t["b_enc"]).numpy())
    np.testing.assert_array_equal(
        snp.jumprelu_encode(a["x"], a["W_enc"], a["b_enc"], a["log_threshold"], 0.05),
        sparsekit.jumprelu_encode(t["x"], t["W_enc"], t["b_enc"], t["log_threshold"], 0.05).detach().numpy())
    np.testing.assert_array_equal(
        snp.sparse_decode(codes.values, codes.indices, a["W_dec"], a["b_dec"]),
        sparsekit.sparse_decode(expected.values, expected.indices, t["W_dec"], t["b_dec"]).numpy())
    np.testing.assert_array_equal(
        snp.sparse_decode_coo(*batch, a["W_dec"], a["b_dec"], batch_size=20),
        sparsekit.sparse_decode_coo(*(torch.from_numpy(c) for c in batch), t["W_dec"], t["b_dec"], 20).numpy())


def spy(monkeypatch, op):
    """Wrap the C++ custom op that runs ``op`` (sparsekit.ops.cpu_ops()): record the data pointers
    of its tensor arguments and its outputs."""
    table = ops.cpu_ops()
    calls, original = [], table[op]

    def wrapper(*args):
        out = original(*args)
        calls.append(([a.data_ptr() for a in args if isinstance(a, torch.Tensor)], out))
        return out
    monkeypatch.setitem(table, op, wrapper)
    return calls


def test_inputs_reach_the_cpp_kernel_without_a_copy_and_outputs_come_back_as_views(monkeypatch):
    if sparsekit.backends()["cpu"] != "cpp":
        pytest.skip("sparsekit._C is not built")
    a = arrays(np.float64, seed=1)
    calls = spy(monkeypatch, "topk_encode")
    codes = snp.topk_encode(a["x"], a["W_enc"], a["b_enc"], k=4)
    (pointers, (values, indices)), = calls
    assert pointers == [a["x"].ctypes.data, a["W_enc"].ctypes.data, a["b_enc"].ctypes.data]
    assert np.shares_memory(codes.values, values.numpy()) and np.shares_memory(codes.indices, indices.numpy())
    assert not codes.values.flags.owndata

    calls = spy(monkeypatch, "sparse_decode")
    y = snp.sparse_decode(codes.values, codes.indices, a["W_dec"], a["b_dec"])
    (pointers, out), = calls
    assert pointers[0] == codes.values.ctypes.data  # values, then rows (made here), cols (= indices)
    assert pointers[2:] == [codes.indices.ctypes.data, a["W_dec"].ctypes.data, a["b_dec"].ctypes.data]
    assert np.shares_memory(y, out.numpy())


def test_read_only_and_non_contiguous_arrays_work_without_warnings():
    a = arrays(np.float32, seed=2)
    expected = snp.relu_encode(a["x"], a["W_enc"], a["b_enc"])
    frozen = a["x"].copy()
    frozen.flags.writeable = False
    fortran = np.asfortranarray(a["W_enc"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = snp.relu_encode(frozen, fortran, a["b_enc"])
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sparse_decode_backward_matches_autograd_on_the_reference(dtype):
    a = arrays(dtype, seed=3)
    codes = snp.topk_encode(a["x"], a["W_enc"], a["b_enc"], k=6)
    grad_y = np.random.default_rng(4).standard_normal((20, 12)).astype(dtype)
    grads = snp.sparse_decode_backward(codes.values, codes.indices, a["W_dec"], a["b_dec"], grad_y)

    values, W_dec, b_dec = (torch.from_numpy(v.copy()).requires_grad_() for v in (codes.values, a["W_dec"], a["b_dec"]))
    y = sparsekit.ops.reference.sparse_decode(values, torch.from_numpy(codes.indices), W_dec, b_dec)
    expected = torch.autograd.grad(y, (values, W_dec, b_dec), torch.from_numpy(grad_y))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, expected):
        assert isinstance(got, np.ndarray) and got.dtype == dtype
        np.testing.assert_allclose(got, want.numpy(), **tol)

    batch = snp.batchtopk_encode(a["x"], a["W_enc"], a["b_enc"], k=6)
    coo = snp.sparse_decode_coo_backward(*batch, a["W_dec"], a["b_dec"], grad_y)
    values = torch.from_numpy(batch.values.copy()).requires_grad_()
    W_dec = torch.from_numpy(a["W_dec"].copy()).requires_grad_()
    y = sparsekit.ops.reference.sparse_decode_coo(values, torch.from_numpy(batch.rows), torch.from_numpy(batch.cols),
                                              W_dec, torch.from_numpy(a["b_dec"]), 20)
    want_values, want_W_dec = torch.autograd.grad(y, (values, W_dec), torch.from_numpy(grad_y))
    np.testing.assert_allclose(coo.values, want_values.numpy(), **tol)
    np.testing.assert_allclose(coo.W_dec, want_W_dec.numpy(), **tol)
    np.testing.assert_allclose(coo.b_dec, grad_y.sum(0), **tol)


def test_bad_arguments_raise_value_errors_naming_them():
    a = arrays()
    with pytest.raises(ValueError, match="x must be a NumPy array or support DLPack"):
        snp.relu_encode(a["x"].tolist(), a["W_enc"], a["b_enc"])
    with pytest.raises(ValueError, match="W_enc has dtype"):
        snp.topk_encode(a["x"], a["W_enc"].astype(np.float64), a["b_enc"], k=3)
    with pytest.raises(ValueError, match="k=41 exceeds n_latents=40"):
        snp.topk_encode(a["x"], a["W_enc"], a["b_enc"], k=41)
    codes = snp.topk_encode(a["x"], a["W_enc"], a["b_enc"], k=3)
    with pytest.raises(ValueError, match="grad_y must have shape \\(20, 12\\) and dtype float32"):
        snp.sparse_decode_backward(codes.values, codes.indices, a["W_dec"], a["b_dec"], np.zeros((20, 11), np.float32))
    with pytest.raises(ValueError, match="array must support DLPack"):
        snp.from_dlpack([1.0, 2.0])


def test_dlpack_helpers_share_memory():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    t = snp.from_dlpack(x)
    assert isinstance(t, torch.Tensor) and t.data_ptr() == x.ctypes.data
    exported = snp.to_dlpack(t)
    back = np.from_dlpack(exported)
    assert np.shares_memory(back, x)
    capsule = snp.to_dlpack(x, capsule=True)
    assert torch.utils.dlpack.from_dlpack(capsule).data_ptr() == x.ctypes.data


def test_dlpack_inputs_give_tensors_that_export_dlpack():
    a = arrays(np.float64, seed=5)
    as_tensors = {name: snp.from_dlpack(v) for name, v in a.items()}
    codes = snp.topk_encode(as_tensors["x"], as_tensors["W_enc"], as_tensors["b_enc"], k=4)
    assert isinstance(codes.values, torch.Tensor) and hasattr(codes.values, "__dlpack__")
    np.testing.assert_array_equal(codes.values.numpy(), snp.topk_encode(a["x"], a["W_enc"], a["b_enc"], k=4).values)


def test_jax_arrays_pass_both_ways_without_copies():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    a = arrays(np.float32, seed=6)
    j = {name: jnp.asarray(v) for name, v in a.items()}
    x_view = snp.from_dlpack(j["x"])
    assert x_view.data_ptr() == j["x"].unsafe_buffer_pointer()
    codes = snp.topk_encode(j["x"], j["W_enc"], j["b_enc"], k=5)
    y = snp.sparse_decode(codes.values, codes.indices, j["W_dec"], j["b_dec"])
    y_jax = jnp.from_dlpack(y)
    assert y_jax.unsafe_buffer_pointer() == y.data_ptr()
    expected = snp.sparse_decode(*snp.topk_encode(a["x"], a["W_enc"], a["b_enc"], k=5), a["W_dec"], a["b_dec"])
    np.testing.assert_array_equal(np.asarray(y_jax), expected)
