"""Few-shot episodes: exact on separable features, chance on noise, intervals that shrink."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.evaluation.fewshot import fewshot_accuracy


def clustered(noise: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(1000) % 10
    features = F.one_hot(labels, 10).float() + noise * torch.randn(1000, 10, generator=g)
    return features, labels


def episodes(features, labels, n: int, shots: int = 1, seed: int = 0):
    return fewshot_accuracy(
        features, labels, ways=5, shots=shots, queries=15, episodes=n, seed=seed
    )


def test_separable_features_are_always_right() -> None:
    result = episodes(*clustered(0.01), 50)
    assert result is not None and result.mean == 1.0 and result.ci95 == 0.0


def test_pure_noise_is_chance() -> None:
    g = torch.Generator().manual_seed(0)
    result = episodes(torch.randn(1000, 16, generator=g), torch.arange(1000) % 10, 400)
    assert result is not None and abs(result.mean - 1 / 5) < 0.02


def test_interval_shrinks_with_more_episodes_and_repeats_with_the_seed() -> None:
    features, labels = clustered(0.6)
    few, many = episodes(features, labels, 25), episodes(features, labels, 400)
    assert few is not None and many is not None
    assert many.ci95 < 0.5 * few.ci95  # ~ 1 / sqrt(episodes): a quarter, with sampling slack
    assert episodes(features, labels, 25) == few
    assert episodes(features, labels, 25, seed=1) != few
    more_shots = episodes(features, labels, 400, shots=5)
    assert more_shots is not None and more_shots.mean > many.mean


def test_too_few_classes_gives_nothing() -> None:
    features, labels = clustered(0.1)
    keep = labels < 3
    assert episodes(features[keep], labels[keep], 10) is None
