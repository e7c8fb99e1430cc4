"""docs/interop.md's examples ("Use from other frameworks") run as printed (in a temporary folder, W&B offline)."""
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import sparsekit

DOC = Path(__file__).resolve().parents[2] / "docs" / "interop.md"


def examples() -> dict:
    """Section title -> its python code block, from docs/interop.md."""
    blocks = {}
    for part in DOC.read_text().split("\n## ")[1:]:
        title, body = part.split("\n", 1)
        code = re.search(r"```python\n(.*?)```", body, re.S)
        assert code, f"docs/interop.md section {title!r} has no python example"
        blocks[title.strip()] = code.group(1)
    return blocks


def run(title, tmp_path, monkeypatch, replace=()) -> dict:
    code = examples()[title]
    for old, new in replace:
        assert old in code
        code = code.replace(old, new)
    assert len(code.strip().splitlines()) <= 12, f"the {title!r} example should stay short"
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, f"docs/interop.md ({title})", "exec"), namespace)
    return namespace


def test_every_section_has_an_example():
    assert list(examples()) == ["torch.compile", "NumPy and DLPack (JAX, CuPy)", "SAELens, both ways",
                                "Sharing dictionaries: the Hub, sparsify, dictionary_learning",
                                "Hugging Face transformers, without TransformerLens", "Weights & Biases"]


def test_torch_compile_example(tmp_path, monkeypatch):
    monkeypatch.delenv("SPARSEKIT_BACKEND", raising=False)
    torch._dynamo.reset()
    # Inductor's code generation takes ~40 s on 2 busy cores; aot_eager traces the same fullgraph
    # forward and backward through the custom ops (inductor itself is run in test_compile.py).
    ns = run("torch.compile", tmp_path, monkeypatch, [("fullgraph=True)", "fullgraph=True, backend='aot_eager')")])
    assert ns["sae"].W_enc.grad is not None and torch.isfinite(ns["sae"].W_enc.grad).all()
    assert torch.allclose(ns["sae"].W_dec.norm(dim=-1), torch.ones(512))


def test_numpy_and_jax_example(tmp_path, monkeypatch):
    pytest.importorskip("jax")
    ns = run("NumPy and DLPack (JAX, CuPy)", tmp_path, monkeypatch)
    assert isinstance(ns["x_hat"], np.ndarray) and ns["x_hat"].shape == (128, 64)
    assert ns["grads"].W_dec.shape == (512, 64)
    assert isinstance(ns["y"], torch.Tensor) and ns["y_jax"].unsafe_buffer_pointer() == ns["y"].data_ptr()


def test_saelens_example(tmp_path, monkeypatch):
    pytest.importorskip("sae_lens")
    ns = run("SAELens, both ways", tmp_path, monkeypatch)
    assert isinstance(ns["sae"], sparsekit.TopKSAE)
    x = torch.randn(32, 64)
    with torch.no_grad():
        torch.testing.assert_close(ns["sae"].reconstruct(x), ns["lens"](x), rtol=1e-5, atol=1e-5)


def test_hugging_face_example(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    ns = run("Hugging Face transformers, without TransformerLens", tmp_path, monkeypatch)
    x, y = next(iter(ns["pairs"]))
    assert x.shape == y.shape == (8 * 32, 64) and next(iter(ns["mlp_out"])).shape == (8 * 32, 64)
    assert ns["result"].metrics["step"] == 8 and np.isfinite(ns["result"].metrics["fvu"])


def test_wandb_example(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    for name, value in (("WANDB_MODE", "offline"), ("WANDB_DIR", str(tmp_path)), ("WANDB_SILENT", "true"),
                        ("WANDB_CONSOLE", "off")):
        monkeypatch.setenv(name, value)
    wandb.teardown()  # wandb keeps its settings (WANDB_DIR) in a process-wide singleton
    try:
        run("Weights & Biases", tmp_path, monkeypatch)
    finally:
        wandb.teardown()
    assert len(list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))) == 1
    assert (tmp_path / "runs/wandb/metrics.jsonl").stat().st_size > 0
