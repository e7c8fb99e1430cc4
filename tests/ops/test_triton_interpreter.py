"""kernels/sparsekit_kernels/_interpreter.py: Triton's interpreter patches triton.language once per launch, not once
per nested helper call, and leaves it as it found it."""
import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the kernels run compiled, not interpreted")


def _topk(batch: int):
    from sparsekit.kernels.select import topk_rows

    pre = torch.randn(batch, 10, generator=torch.Generator().manual_seed(batch))
    values, indices = topk_rows(pre, 3)
    expected = torch.sort(pre, dim=1, descending=True, stable=True)
    assert torch.equal(indices, expected.indices[:, :3])
    assert torch.equal(values, torch.relu(expected.values[:, :3]))


def test_helpers_inside_a_launch_do_not_repatch_the_language(monkeypatch):
    from triton.runtime import interpreter

    from sparsekit.kernels import _config

    assert _config.INTERPRETING and getattr(interpreter._patch_lang, "_sparsekit_wrapper", False)
    _topk(2)  # the first launch may patch triton.language.core for the standard library's helpers
    walks = []
    original = interpreter._patch_builtin
    monkeypatch.setattr(interpreter, "_patch_builtin", lambda *args: walks.append(args[0]) or original(*args))
    _topk(1)
    per_launch = len(walks)
    walks.clear()
    _topk(6)  # six programs, each calling the selection helpers 13 times: still one walk per package
    assert 0 < per_launch == len(walks) <= 4, (per_launch, len(walks))


def test_the_language_is_restored_after_a_launch():
    import triton.language as tl

    before = {name: getattr(tl, name) for name in ("arange", "load", "store", "where", "cumsum", "histogram")}
    tensor_add = tl.tensor.__add__
    _topk(3)
    assert {name: getattr(tl, name) for name in before} == before
    assert tl.tensor.__add__ is tensor_add
