"""N-way K-shot episodes with a nearest-prototype classifier (Snell et al. 2017, no training).

Each episode draws N classes of the split, K support and Q query images per class; a query goes
to the class whose mean support feature (prototype) is nearest in squared Euclidean distance.
What it measures that a probe does not: how usable the features are from a handful of labels.
Episodes are seeded, so the same features give the same mean and interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

Z95 = 1.959963984540054  # two-sided 95% normal quantile


@dataclass(frozen=True)
class FewShotResult:
    mean: float
    ci95: float  # half-width of the 95% confidence interval of the mean accuracy
    episodes: int


def fewshot_accuracy(
    features: Tensor,
    labels: Tensor,
    *,
    ways: int,
    shots: int,
    queries: int,
    episodes: int,
    seed: int,
) -> FewShotResult | None:
    """Mean episode accuracy and its 95% interval (normal approximation over episodes).

    Queries per class shrink to what the smallest class allows after the support; None when
    there are fewer than `ways` classes with more than `shots` images (nothing to score)."""
    by_class = [(labels == c).nonzero().flatten() for c in labels.unique(sorted=True)]
    usable = [members for members in by_class if len(members) > shots]
    if len(usable) < ways or episodes < 2:
        return None
    per_class = min(queries, min(len(m) for m in usable) - shots)
    generator = torch.Generator().manual_seed(seed)
    accuracies = torch.empty(episodes)
    for episode in range(episodes):
        chosen = torch.randperm(len(usable), generator=generator)[:ways]
        picks = torch.stack(
            [
                usable[c][torch.randperm(len(usable[c]), generator=generator)[: shots + per_class]]
                for c in chosen.tolist()
            ]
        )  # [ways, shots + per_class]
        support, query = features[picks[:, :shots]], features[picks[:, shots:]]
        prototypes = support.mean(dim=1)  # [ways, D]
        distances = torch.cdist(query.flatten(0, 1), prototypes)  # [ways * per_class, ways]
        truth = torch.arange(ways).repeat_interleave(per_class)
        accuracies[episode] = (distances.argmin(dim=1) == truth).float().mean()
    spread = accuracies.std(unbiased=True).item()
    return FewShotResult(
        mean=accuracies.mean().item(), ci95=Z95 * spread / math.sqrt(episodes), episodes=episodes
    )
