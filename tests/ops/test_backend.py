"""Backend selection: visible, forcible, loud when unavailable; the package works without the C++
extension (sparsekit._C_<level>)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import sparsekit


def test_backends_reports_cpp_on_cpu_when_the_extension_is_built(monkeypatch):
    monkeypatch.delenv("SPARSEKIT_BACKEND", raising=False)
    from sparsekit.ops.backend import _C
    assert _C is not None, "sparsekit's C++ extension did not build; make test expects it"
    from sparsekit.ops.backend import CPP_ISA, triton_installed
    expected_cuda = None if not torch.cuda.is_available() else ("triton" if triton_installed() else "torch")
    assert sparsekit.backends() == {"cpu": "cpp", "cuda": expected_cuda, "cpu_isa": CPP_ISA}
    assert CPP_ISA in ("avx512", "avx2", "baseline")


def test_forcing_torch_backend_is_reported_and_used(monkeypatch):
    monkeypatch.setenv("SPARSEKIT_BACKEND", "torch")
    assert sparsekit.backends()["cpu"] == "torch"
    x, W, b = torch.randn(3, 4, requires_grad=True), torch.randn(4, 5), torch.randn(5)
    values, _ = sparsekit.topk_encode(x, W, b, 2)
    assert "sparsekit" not in type(values.grad_fn).__name__.lower()  # plain autograd, not a custom op


def test_default_cpu_path_goes_through_the_custom_op(monkeypatch):
    monkeypatch.delenv("SPARSEKIT_BACKEND", raising=False)
    x, W, b = torch.randn(3, 4, requires_grad=True), torch.randn(4, 5), torch.randn(5)
    calls = []
    from sparsekit.ops.backend import _C
    original = _C.topk_select_block

    def spy(*args):
        calls.append(args[3])  # k
        return original(*args)

    monkeypatch.setattr(_C, "topk_select_block", spy)
    sparsekit.topk_encode(x, W, b, 2)
    assert calls == [2]


def test_forcing_an_unknown_backend_fails_loudly(monkeypatch):
    monkeypatch.setenv("SPARSEKIT_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="is not one of torch, cpp, triton"):
        sparsekit.backends()
    with pytest.raises(RuntimeError, match="is not one of torch, cpp, triton"):
        sparsekit.topk_encode(torch.randn(2, 3), torch.randn(3, 4), torch.randn(4), 1)


def test_forcing_triton_on_cpu_tensors_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("SPARSEKIT_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    message = "SPARSEKIT_BACKEND=triton is unavailable: CPU tensors run the Triton kernels only under"
    with pytest.raises(RuntimeError, match=message):
        sparsekit.topk_encode(torch.randn(2, 3), torch.randn(3, 4), torch.randn(4), 1)
    if not torch.cuda.is_available():  # nothing here could run the forced backend
        with pytest.raises(RuntimeError, match=message):
            sparsekit.backends()


def test_forcing_triton_under_the_interpreter_runs_cpu_tensors_in_32_and_16_bit(monkeypatch):
    monkeypatch.setenv("SPARSEKIT_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if not torch.cuda.is_available():
        assert sparsekit.backends() == {"cpu": "triton", "cuda": None, "cpu_isa": None}
    x, W, b = torch.randn(3, 4, requires_grad=True), torch.randn(4, 5), torch.randn(5)
    values, _ = sparsekit.topk_encode(x, W, b, 2)
    assert "topk_encode_triton" in type(values.grad_fn).__name__
    with pytest.raises(RuntimeError, match="SPARSEKIT_BACKEND=triton supports float32/bfloat16/float16"):
        sparsekit.relu_encode(x.double(), W.double(), b.double())


def test_default_backends_ignore_the_interpreter_switch(monkeypatch):
    # TRITON_INTERPRET (set by conftest without CUDA) never moves CPU tensors off the C++ path.
    monkeypatch.delenv("SPARSEKIT_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert sparsekit.backends()["cpu"] == "cpp"


def test_cpu_half_precision_uses_the_reference_unless_cpp_is_forced(monkeypatch):
    x, W, b = torch.randn(3, 4).half(), torch.randn(4, 5).half(), torch.randn(5).half()
    monkeypatch.delenv("SPARSEKIT_BACKEND", raising=False)
    assert sparsekit.relu_encode(x, W, b).dtype == torch.float16
    monkeypatch.setenv("SPARSEKIT_BACKEND", "cpp")
    with pytest.raises(RuntimeError, match="supports float32/float64"):
        sparsekit.relu_encode(x, W, b)


def _run_without_extension(code: str, **env) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter in which importing any of sparsekit's C++ modules fails."""
    prelude = ("import sys\nfor level in ('avx512', 'avx2', 'baseline'):\n"
               "    sys.modules[f'sparsekit._C_{level}'] = None\n")
    environment = {name: value for name, value in os.environ.items() if name != "SPARSEKIT_BACKEND"}
    environment.update(env)
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          env=environment, timeout=120)


def test_package_imports_and_every_op_runs_without_the_extension():
    result = _run_without_extension("""
        import torch, sparsekit
        assert sparsekit.backends()["cpu"] == "torch", sparsekit.backends()
        x, W, b = torch.randn(5, 4, requires_grad=True), torch.randn(4, 6), torch.randn(6)
        Wd, bd = torch.randn(6, 4, requires_grad=True), torch.randn(4)
        v, i = sparsekit.topk_encode(x, W, b, 2)
        y = sparsekit.sparse_decode(v, i, Wd, bd)
        c = sparsekit.batchtopk_encode(x, W, b, 2)
        y2 = sparsekit.sparse_decode_coo(c.values, c.rows, c.cols, Wd, bd, 5)
        r = sparsekit.relu_encode(x, W, b) + sparsekit.jumprelu_encode(x, W, b, torch.zeros(6))
        g = sparsekit.ghost_grad_loss(x, W, b, Wd, torch.tensor([1, 3]), torch.randn(5, 4), torch.tensor(1.0))
        (y.sum() + y2.sum() + r.sum() + g).backward()
        assert x.grad is not None and Wd.grad is not None
        print("ok")
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_forcing_cpp_without_the_extension_fails_loudly():
    result = _run_without_extension("""
        import torch, sparsekit
        sparsekit.relu_encode(torch.randn(2, 3), torch.randn(3, 4), torch.randn(4))
    """, SPARSEKIT_BACKEND="cpp")
    assert result.returncode != 0
    assert "SPARSEKIT_BACKEND=cpp but sparsekit's C++ extension is unavailable" in result.stderr


def test_import_sparsekit_is_light():
    # No Triton, TransformerLens or custom-op registration at import time.
    result = subprocess.run([sys.executable, "-c", "import sys, sparsekit; print(sorted(m for m in "
                             "('triton', 'transformer_lens', 'sparsekit.ops.cpu.encode', 'sparsekit.ops.cpu.decode', "
                             "'sparsekit.ops.cpu.ghost', 'sparsekit.ops.cpu.sparse') if m in sys.modules))"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
