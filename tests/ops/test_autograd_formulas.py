"""sparsekit.ops.autograd: every backend's forward ops, registered through it, pass torch's
custom-op checks: schema, autograd registration and the fake kernels (shapes, dtypes and devices
under FakeTensor, as torch.compile traces them). Outputs and gradients against the reference are
tests/ops/test_ops_parity.py's, tests/ops/test_triton_ops.py's and tests/ops/test_fuzz.py's."""
import pytest
import torch

from sparsekit import ops
from sparsekit.ops.backend import _C

CHECKS = ("test_schema", "test_autograd_registration", "test_faketensor")


def _arguments(op_name: str):
    gen = torch.Generator().manual_seed(3)
    leaf = lambda *shape: torch.randn(*shape, generator=gen).requires_grad_()  # noqa: E731
    x, W_enc, b_enc = leaf(3, 4), leaf(4, 5), leaf(5)
    if op_name in ("topk_encode", "batchtopk_encode"):
        return (x, W_enc, b_enc, 2)
    if op_name == "relu_encode":
        return (x, W_enc, b_enc)
    if op_name == "jumprelu_encode":
        return (x, W_enc, b_enc, leaf(5), 0.1)
    if op_name == "sparse_decode":
        return (leaf(6), torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([1, 3, 0, 4, 2, 2]), leaf(5, 4), leaf(4), 3)
    assert op_name == "ghost_grad_loss"
    return (x, W_enc, b_enc, torch.randn(5, 4, generator=gen), torch.tensor([1, 3]), torch.randn(3, 4, generator=gen),
            torch.tensor(1.5), 1e-8)


def _backend_op(backend: str, op_name: str):
    return (ops.cpu_ops() if backend == "cpp" else ops.triton_ops())[op_name]


BACKENDS = (["cpp"] if _C is not None else []) + ([] if torch.cuda.is_available() else ["triton"])
OP_NAMES = ("topk_encode", "batchtopk_encode", "relu_encode", "jumprelu_encode", "sparse_decode", "ghost_grad_loss")


@pytest.mark.parametrize("op_name", OP_NAMES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_ops_pass_the_custom_op_checks(backend, op_name):
    args = _arguments(op_name)
    if backend == "triton" and op_name == "sparse_decode":
        args = (*args, True)  # rows sorted
    results = torch.library.opcheck(_backend_op(backend, op_name), args, test_utils=CHECKS)
    assert results == {name: "SUCCESS" for name in CHECKS}
