"""MNIST feature analysis on planted cases: top images, mean images, digit assignment, logit weights,
template score, and the HTML builders' escaping."""
import base64
import re

import numpy as np
import pytest
import torch

from sparsekit.analysis import html_report
from sparsekit.analysis.mnist_features import (
    NO_LABEL,
    analyse_features,
    features_per_digit,
    logit_weights,
    majority_labels,
    mean_images,
    template_score,
    top_activating,
)
from sparsekit.sae import ReLUSAE
from sparsekit.toys.mnist_mlp import MNISTMLP


def generator() -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence().generate_state(1)[0]))


def test_top_activating_orders_positive_activations_and_marks_missing_ones():
    g = generator()
    codes = torch.zeros(50, 3)
    rows = torch.randperm(50, generator=g)[:4]
    values = torch.tensor([0.5, 3.0, 1.0, 2.0])
    codes[rows, 1] = values
    codes[:, 2] = torch.rand(50, generator=g) + 0.1  # fires everywhere
    indices, top = top_activating(codes, 6)
    order = values.argsort(descending=True)
    assert indices[1, :4].tolist() == rows[order].tolist() and top[1, :4].tolist() == values[order].tolist()
    assert indices[1, 4:].tolist() == [-1, -1] and top[1, 4:].tolist() == [0, 0]
    assert (indices[0] == -1).all()  # never fires
    assert indices[2].tolist() == codes[:, 2].argsort(descending=True)[:6].tolist()
    with pytest.raises(ValueError, match="count"):
        top_activating(codes, 0)


def test_mean_image_is_the_activation_weighted_mean_of_the_images_it_fires_on():
    g = generator()
    images = torch.rand(30, 784, generator=g)
    codes = torch.zeros(30, 2)
    codes[3, 0], codes[7, 0] = 1.0, 3.0
    means = mean_images(codes, images)
    torch.testing.assert_close(means[0], (images[3] + 3 * images[7]) / 4)
    assert (means[1] == 0).all()
    with pytest.raises(ValueError, match="rows"):
        mean_images(codes, images[:5])


def test_majority_label_and_purity_of_top_images():
    labels = torch.tensor([7, 7, 2, 7, 2, 5])
    top = torch.tensor([[0, 1, 2, 3], [2, 4, 5, -1], [-1, -1, -1, -1], [5, 2, -1, -1]])
    majority, purity = majority_labels(top, labels)
    assert majority.tolist() == [7, 2, NO_LABEL, 2]  # 2 vs 5 tie: the smaller digit
    assert purity.tolist() == pytest.approx([0.75, 2 / 3, 0.0, 0.5])
    assert features_per_digit(majority, torch.tensor([True, True, False, False])) == [0, 0, 1, 0, 0, 0, 0, 1, 0, 0]


def test_template_score_counts_alive_features_whose_logit_class_is_their_digit():
    g = generator()
    n = 40
    majority = torch.randint(0, 10, (n,), generator=g)
    agree = torch.rand(n, generator=g) < 0.6
    logit_class = torch.where(agree, majority, (majority + 1) % 10)
    alive = torch.rand(n, generator=g) < 0.8
    alive[0] = True
    assert template_score(logit_class, majority, alive) == pytest.approx(float(agree[alive].double().mean()))
    assert template_score(logit_class, majority, torch.zeros(n, dtype=torch.bool)) is None


def planted_model(depth: int, hidden: int = 6) -> MNISTMLP:
    """A readout that maps unit direction e_i to class (3 i + 1) mod 10; middle layers pass
    non-negative activations through unchanged."""
    model = MNISTMLP(hidden=hidden, depth=depth)
    with torch.no_grad():
        for block in model.layers[1:]:
            block.linear.weight.copy_(torch.eye(hidden))
            block.linear.bias.zero_()
        model.readout.weight.zero_()
        model.readout.bias.copy_(torch.randn(10, generator=generator()))
        for i in range(hidden):
            model.readout.weight[(3 * i + 1) % 10, i] = 2.0
    return model


@pytest.mark.parametrize("depth", [1, 2])
def test_logit_weights_of_a_planted_direction_pick_its_class(depth):
    model = planted_model(depth)
    directions = torch.eye(6)[[4, 0, 2]]
    base = torch.rand(32, 6, generator=generator())  # non-negative, like post-ReLU activations
    weights = logit_weights(model, 0, directions, base, magnitudes=torch.tensor([0.5, 1.0, 2.0]))
    assert weights.argmax(1).tolist() == [3, 1, 7]
    torch.testing.assert_close(weights, directions @ model.readout.weight.t())  # linear here: equal to the direct path
    if depth == 2:
        with pytest.raises(ValueError, match="base activations and magnitudes"):
            logit_weights(model, 0, directions)
    with pytest.raises(ValueError, match="layer"):
        logit_weights(model, depth, directions)


@pytest.mark.parametrize("depth", [1, 2])
def test_a_feature_aligned_with_one_class_gets_that_class(depth):
    """Latent i = hidden unit i (identity dictionary); unit i fires only on images of digit
    (3 i + 1) mod 10, which the readout also maps it to: every feature is a perfect template."""
    g = generator()
    hidden = 6
    model = planted_model(depth, hidden)
    labels = torch.randint(0, 10, (300,), generator=g)
    images = torch.rand(300, 784, generator=g)
    acts = torch.zeros(300, hidden)
    for i in range(hidden):
        mine = labels == (3 * i + 1) % 10
        acts[mine, i] = torch.rand(int(mine.sum()), generator=g) + 0.5
    sae = ReLUSAE(hidden, hidden, l1_coeff=1.0)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(hidden)), sae.W_dec.copy_(torch.eye(hidden))
        sae.b_enc.zero_(), sae.b_dec.zero_()
    result = analyse_features(model, depth - 1, sae, acts, images, labels, count=5)
    assert result.majority.tolist() == [(3 * i + 1) % 10 for i in range(hidden)]
    assert result.logit_class.tolist() == result.majority.tolist()
    assert result.template_score == 1.0 and result.purity.tolist() == [1.0] * hidden
    assert result.per_digit == [1 if d in {(3 * i + 1) % 10 for i in range(hidden)} else 0 for d in range(10)]
    top = result.top_indices[0]
    assert set(top.tolist()) <= set(torch.nonzero(labels == 1).flatten().tolist())
    weights = acts[:, 0]
    torch.testing.assert_close(result.mean_images[0], (weights[:, None] * images).sum(0) / weights.sum())
    # The readout permuted: each feature now votes for another digit than it looks like.
    with torch.no_grad():
        model.readout.weight.copy_(model.readout.weight.roll(1, dims=0))
    assert analyse_features(model, depth - 1, sae, acts, images, labels, count=5).template_score == 0.0


def test_html_builders_escape_data_and_inline_images():
    evil = "<script>alert('x')</script> & \"q\""
    fragment = html_report.table(["a<b", "c"], [[evil, 1.234567]], {"held": "held"})
    assert "<script>" not in fragment and "&lt;script&gt;" in fragment and "&amp;" in fragment
    assert "a&lt;b" in fragment and "1.235" in fragment
    png = html_report.array_png(np.random.default_rng().random((28, 56)))
    figure = html_report.image(png, caption=evil)
    uri = re.search(r'src="data:image/png;base64,([^"]+)"', figure).group(1)
    assert base64.b64decode(uri) == png and "<script>" not in figure
    document = html_report.page(evil, [figure])
    assert document.count("<script>") == 0 and "<title>&lt;script&gt;" in document
    with pytest.raises(ValueError, match="PNG"):
        html_report.png_data_uri(b"GIF89a")
