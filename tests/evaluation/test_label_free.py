"""The label-free metrics on cases whose answer is known, against numpy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.evaluation.label_free import alignment, neighbourhood_agreement, rankme, uniformity


def _sphere(n: int, d: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=generator), dim=1)


def _rankme_numpy(x: np.ndarray) -> float:
    """exp(entropy) of the normalised singular values, by numpy's SVD."""
    s = np.linalg.svd(x.astype(np.float64), compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def test_rankme_collapsed_encoder_is_one() -> None:
    direction = torch.randn(1, 32)
    scales = torch.rand(200, 1) + 0.5  # every row on one line through the origin
    assert rankme(scales * direction) == pytest.approx(1.0, abs=1e-3)


def test_rankme_isotropic_gaussian_is_near_full_rank() -> None:
    features = torch.randn(4000, 16, generator=torch.Generator().manual_seed(0))
    assert rankme(features) == pytest.approx(16, rel=0.02)


def test_rankme_matches_numpy_on_uneven_spectrum() -> None:
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(300, 12, generator=generator) * torch.linspace(0.1, 3.0, 12)
    assert rankme(features) == pytest.approx(_rankme_numpy(features.numpy()), rel=1e-4)


def test_rankme_ignores_the_basis() -> None:
    """A permuted or rotated copy of an encoder has the same singular values."""
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(256, 10, generator=generator) * torch.linspace(0.2, 2.0, 10)
    permuted = features[:, torch.randperm(10, generator=generator)]
    rotation, _ = torch.linalg.qr(torch.randn(10, 10, generator=generator))
    expected = rankme(features)
    assert 3 < expected < 10  # a spectrum that is neither collapsed nor flat
    assert rankme(permuted) == pytest.approx(expected, rel=1e-6)
    assert rankme(features @ rotation) == pytest.approx(expected, rel=1e-6)


def test_alignment_constant_encoder_is_zero_and_matches_numpy() -> None:
    constant = F.normalize(torch.ones(50, 8), dim=1)
    assert alignment(constant, constant.clone()) == 0.0
    a, b = _sphere(100, 8, 3), _sphere(100, 8, 4)
    reference = np.mean(np.sum((a.numpy() - b.numpy()) ** 2, axis=1))
    assert alignment(a, b) == pytest.approx(float(reference), rel=1e-5)
    assert alignment(a, -a) == pytest.approx(4.0, rel=1e-5)  # antipodal views: the worst case


def test_uniformity_matches_numpy_formula() -> None:
    x = _sphere(60, 5, 5).double().numpy()
    squared = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    pairs = squared[np.triu_indices(len(x), k=1)]  # i < j: different images, each pair once
    reference = np.log(np.mean(np.exp(-2.0 * pairs)))
    assert uniformity(torch.from_numpy(x)) == pytest.approx(float(reference), rel=1e-6)
    # a collapsed encoder is maximally non-uniform: every pair at distance 0, log 1 = 0
    assert uniformity(F.normalize(torch.ones(20, 5), dim=1)) == pytest.approx(0.0, abs=1e-6)


def test_agreement_identical_is_one_and_unrelated_near_chance() -> None:
    a = _sphere(200, 16, 6)
    assert neighbourhood_agreement(a, a.clone(), k=10) == 1.0
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(7)))
    assert neighbourhood_agreement(a, a @ rotation, k=10) == 1.0  # cosine geometry unchanged
    unrelated = neighbourhood_agreement(a, _sphere(200, 16, 8), k=10)
    assert unrelated < 0.2  # chance is k / (N - 1) = 0.05


@pytest.mark.parametrize("k", [5, 25])  # 25 of 39: past the neighbours of positive cosine
def test_agreement_matches_a_direct_count(k: int) -> None:
    a, b = _sphere(40, 4, 9), _sphere(40, 4, 10)
    a_np, b_np = a.numpy(), b.numpy()
    shared = []
    for i in range(len(a_np)):
        near = [set(np.argsort(-(x @ x[i]))[1 : k + 1]) for x in (a_np, b_np)]  # self first
        shared.append(len(near[0] & near[1]) / k)
    assert neighbourhood_agreement(a, b, k=k) == pytest.approx(float(np.mean(shared)))
