"""Bad input to any op is a ValueError that names the argument, on every backend."""
import pytest
import torch

import sparsekit

F = torch.float32


def enc(B=4, d=3, n=6):
    return torch.randn(B, d), torch.randn(d, n), torch.randn(n)


def dec(B=4, k=2, n=6, d=3):
    return torch.randn(B, k), torch.randint(0, n, (B, k)), torch.randn(n, d), torch.randn(d)


def nan_at(t, where=0):
    t = t.clone()
    t.view(-1)[where] = float("nan")
    return t


def inf_at(t):
    t = t.clone()
    t.view(-1)[-1] = float("inf")
    return t


x, W, b = enc()
v, i, Wd, bd = dec()
lt = torch.zeros(6)
rows, cols = torch.tensor([0, 1, 3]), torch.tensor([5, 0, 2])
cv = torch.randn(3)

CASES = {
    # topk_encode: rank, size, dtype, device-like mismatches, k range, finite values, empty batch
    "x rank": (lambda: sparsekit.topk_encode(x[0], W, b, 2), "x must be 2-D"),
    "W_enc rows": (lambda: sparsekit.topk_encode(x, W[:2], b, 2), "W_enc has size 2 on axis 0, expected 3"),
    "b_enc size": (lambda: sparsekit.topk_encode(x, W, b[:5], 2), "b_enc has size 5"),
    "x dtype": (lambda: sparsekit.topk_encode(x.double(), W, b, 2), "W_enc has dtype torch.float32, expected torch.float64"),
    "x integer": (lambda: sparsekit.topk_encode(x.long(), W, b, 2), "x must be a floating-point tensor"),
    "W_enc device": (lambda: sparsekit.topk_encode(x, W.to("meta"), b, 2), "W_enc is on meta, expected cpu"),
    "indices device": (lambda: sparsekit.sparse_decode(v, i.to("meta"), Wd, bd), "indices is on meta, expected cpu"),
    "x not tensor": (lambda: sparsekit.topk_encode(x.numpy(), W, b, 2), "x must be a torch.Tensor"),
    "k zero": (lambda: sparsekit.topk_encode(x, W, b, 0), "k=0 must be at least 1"),
    "k too big": (lambda: sparsekit.topk_encode(x, W, b, 7), "k=7 exceeds n_latents=6"),
    "k float": (lambda: sparsekit.topk_encode(x, W, b, 2.0), "k must be an int"),
    "k bool": (lambda: sparsekit.topk_encode(x, W, b, True), "k must be an int"),
    "x nan": (lambda: sparsekit.topk_encode(nan_at(x), W, b, 2), "x contains NaN or Inf"),
    "W_enc inf": (lambda: sparsekit.topk_encode(x, inf_at(W), b, 2), "W_enc contains NaN or Inf"),
    "b_enc nan": (lambda: sparsekit.topk_encode(x, W, nan_at(b), 2), "b_enc contains NaN or Inf"),
    "empty batch": (lambda: sparsekit.topk_encode(x[:0], W, b, 2), "x has an empty batch"),
    "zero latents": (lambda: sparsekit.relu_encode(x, W[:, :0], b[:0]), "W_enc has size 0 on axis 1"),
    "zero width": (lambda: sparsekit.relu_encode(x[:, :0], W[:0], b), "x has size 0 on axis 1"),
    # batchtopk / relu / jumprelu
    "batchtopk k": (lambda: sparsekit.batchtopk_encode(x, W, b, 9), "k=9 exceeds n_latents=6"),
    "batchtopk nan": (lambda: sparsekit.batchtopk_encode(nan_at(x), W, b, 1), "x contains NaN"),
    "relu empty": (lambda: sparsekit.relu_encode(x[:0], W, b), "x has an empty batch"),
    "jumprelu threshold size": (lambda: sparsekit.jumprelu_encode(x, W, b, lt[:3]), "log_threshold has size 3"),
    "jumprelu threshold nan": (lambda: sparsekit.jumprelu_encode(x, W, b, nan_at(lt)), "log_threshold contains NaN"),
    "jumprelu threshold dtype": (lambda: sparsekit.jumprelu_encode(x, W, b, lt.double()), "log_threshold has dtype"),
    "jumprelu bandwidth": (lambda: sparsekit.jumprelu_encode(x, W, b, lt, 0.0), "bandwidth must be a positive"),
    "jumprelu bandwidth nan": (lambda: sparsekit.jumprelu_encode(x, W, b, lt, float("nan")), "bandwidth must be"),
    # sparse_decode
    "indices dtype": (lambda: sparsekit.sparse_decode(v, i.int(), Wd, bd), "indices must be int64"),
    "indices shape": (lambda: sparsekit.sparse_decode(v, i[:, :1], Wd, bd), "indices has shape"),
    "indices range": (lambda: sparsekit.sparse_decode(v, i + 6, Wd, bd), "indices holds indices in"),
    "indices negative": (lambda: sparsekit.sparse_decode(v, i - 6, Wd, bd), "indices holds indices in"),
    "values nan": (lambda: sparsekit.sparse_decode(nan_at(v), i, Wd, bd), "values contains NaN"),
    "values empty": (lambda: sparsekit.sparse_decode(v[:0], i[:0], Wd, bd), "values has an empty batch"),
    "W_dec dtype": (lambda: sparsekit.sparse_decode(v, i, Wd.double(), bd), "W_dec is torch.float64"),
    "b_dec size": (lambda: sparsekit.sparse_decode(v, i, Wd, bd[:2]), "b_dec has size 2"),
    "W_dec inf": (lambda: sparsekit.sparse_decode(v, i, inf_at(Wd), bd), "W_dec contains NaN or Inf"),
    # sparse_decode_coo
    "coo rows shape": (lambda: sparsekit.sparse_decode_coo(cv, rows[:2], cols, Wd, bd, 4), "rows has shape"),
    "coo rows range": (lambda: sparsekit.sparse_decode_coo(cv, rows, cols, Wd, bd, 3), "rows holds indices"),
    "coo cols range": (lambda: sparsekit.sparse_decode_coo(cv, rows, cols + 1, Wd, bd, 4), "cols holds indices"),
    "coo batch size": (lambda: sparsekit.sparse_decode_coo(cv, rows, cols, Wd, bd, 0), "batch_size must be a positive"),
    "coo cols dtype": (lambda: sparsekit.sparse_decode_coo(cv, rows, cols.float(), Wd, bd, 4), "cols must be int64"),
    # ghost_grad_loss
    "ghost dead range": (lambda: sparsekit.ghost_grad_loss(x, W, b, Wd, torch.tensor([6]), torch.randn(4, 3),
                                                           torch.tensor(1.0)), "dead_idx holds indices"),
    "ghost dead repeats": (lambda: sparsekit.ghost_grad_loss(x, W, b, Wd, torch.tensor([1, 1]), torch.randn(4, 3),
                                                             torch.tensor(1.0)), "dead_idx must not repeat"),
    "ghost residual": (lambda: sparsekit.ghost_grad_loss(x, W, b, Wd, torch.tensor([1]), torch.randn(5, 3),
                                                         torch.tensor(1.0)), "residual has size 5 on axis 0"),
    "ghost mse_main": (lambda: sparsekit.ghost_grad_loss(x, W, b, Wd, torch.tensor([1]), torch.randn(4, 3), 1.0),
                       "mse_main must be a 0-d tensor"),
    "ghost W_dec rows": (lambda: sparsekit.ghost_grad_loss(x, W, b, Wd[:5], torch.tensor([1]), torch.randn(4, 3),
                                                           torch.tensor(1.0)), "W_dec has size 5 on axis 0"),
}


@pytest.mark.parametrize("backend_name", ["torch", "cpp"])
@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_raises_value_error_naming_the_argument(name, backend_name, monkeypatch):
    monkeypatch.setenv("SPARSEKIT_BACKEND", backend_name)
    call, message = CASES[name]
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        call()


def test_finite_checks_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("SPARSEKIT_CHECKS", "0")
    values, _ = sparsekit.topk_encode(nan_at(x, where=0), W, b, 2)  # no error: garbage in, garbage out
    assert values.shape == (4, 2)


def test_cpp_kernels_refuse_to_copy_wrong_dtypes_or_layouts():
    # The C++ side never converts silently: a non-contiguous or mistyped array is a TypeError.
    from sparsekit.ops.backend import _C
    pre = torch.randn(4, 8).numpy()
    values, indices = torch.empty(4, 2).numpy(), torch.empty(4, 2, dtype=torch.int64).numpy()
    with pytest.raises(TypeError):
        _C.topk_select(pre[:, ::2], torch.zeros(4).numpy(), 2, values, indices)
    with pytest.raises(TypeError):
        _C.topk_select(pre.astype("float64"), torch.zeros(8).numpy(), 2, values, indices)
    with pytest.raises(ValueError, match="k must be in"):
        _C.topk_select(pre, torch.zeros(8).numpy(), 9, values, indices)
    with pytest.raises(ValueError, match="cols holds an index outside"):
        _C.sampled_dense_dot(torch.tensor([0]).numpy(), torch.tensor([9]).numpy(), pre, pre, torch.empty(1).numpy())
