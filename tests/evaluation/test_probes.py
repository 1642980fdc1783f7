"""kNN and the linear probe against cases with a known answer; label subsets and noise."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moco.knn import knn_top1
from pipeline.evaluation.probes import (
    ProbeRecipe,
    balanced_subset,
    fit_probe,
    symmetric_noise,
    top1,
)

CLASSES = 4


def separable(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class c sits near basis vector c: linearly separable with a wide margin."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % CLASSES
    features = F.one_hot(labels, 16).float() + 0.05 * torch.randn(n, 16, generator=g)
    return F.normalize(features, dim=1), labels


def pure_noise(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    features = F.normalize(torch.randn(n, 32, generator=g), dim=1)
    return features, torch.randint(0, CLASSES, (n,), generator=g)


def test_separable_features_score_100_percent() -> None:
    (train_f, train_y), (test_f, test_y) = separable(400, 0), separable(200, 1)
    assert knn_top1(train_f, train_y, test_f, test_y, CLASSES, [200, 20], 0.1) == {
        200: 1.0,
        20: 1.0,
    }
    assert top1(fit_probe(train_f, train_y, CLASSES), test_f, test_y) == 1.0


def test_noise_features_score_chance() -> None:
    (train_f, train_y), (test_f, test_y) = pure_noise(2000, 0), pure_noise(2000, 1)
    chance, tolerance = 1 / CLASSES, 0.05  # binomial sd at n=2000 is ~0.01
    for acc in knn_top1(train_f, train_y, test_f, test_y, CLASSES, [200, 20], 0.1).values():
        assert abs(acc - chance) < tolerance
    assert abs(top1(fit_probe(train_f, train_y, CLASSES), test_f, test_y) - chance) < tolerance


def test_probe_is_deterministic_and_noise_zero_is_the_clean_probe() -> None:
    features, labels = pure_noise(500, 4)
    recipe = ProbeRecipe(iters=50, weight_decay=1e-3)
    clean = fit_probe(features, labels, CLASSES, recipe)
    again = fit_probe(features, symmetric_noise(labels, 0.0, CLASSES, seed=9), CLASSES, recipe)
    assert torch.equal(clean.linear.weight, again.linear.weight)
    assert torch.equal(clean.linear.bias, again.linear.bias)


@pytest.mark.parametrize("rate", [0.2, 0.4])
def test_symmetric_noise_flips_exactly_rate_to_other_classes(rate: float) -> None:
    labels = torch.arange(1000) % 10
    noisy = symmetric_noise(labels, rate, 10, seed=0)
    assert int((noisy != labels).sum()) == round(rate * 1000)
    assert torch.equal(noisy, symmetric_noise(labels, rate, 10, seed=0))
    assert not torch.equal(noisy, symmetric_noise(labels, rate, 10, seed=1))
    flipped_to = noisy[noisy != labels]
    assert len(flipped_to.unique()) == 10  # spread over classes, not a fixed permutation


def test_balanced_subset_takes_the_fraction_of_every_class() -> None:
    labels = torch.cat([torch.zeros(500), torch.ones(300), torch.full((50,), 2)]).long()
    index = balanced_subset(labels, 0.1, seed=0)
    assert torch.bincount(labels[index]).tolist() == [50, 30, 5]
    assert torch.equal(index, balanced_subset(labels, 0.1, seed=0))
    assert torch.bincount(labels[balanced_subset(labels, 0.001, seed=0)]).tolist() == [1, 1, 1]
