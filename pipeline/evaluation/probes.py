"""Linear probe on frozen features, and the label subsets it is trained on.

The recipe is fixed so numbers compare across runs and models: features are standardised with
the training set's mean and std, then a multinomial logistic regression (zero-initialised, L2
weight decay on the weights) is fitted full-batch by L-BFGS for a fixed number of iterations.
Full-batch and zero-initialised means no seed and no sampling: the same features always give
the same probe. The problem is convex, so the iteration count only sets how close to the optimum
it gets; 100 iterations reach it for 60k x 128 features in about a second here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class ProbeRecipe:
    iters: int = 100
    weight_decay: float = 1e-4


class LinearProbe(nn.Module):
    """Standardise, then one linear layer: features [N, D] -> logits [N, classes]."""

    def __init__(self, mean: Tensor, std: Tensor, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.linear = nn.Linear(mean.shape[0], num_classes)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: Tensor) -> Tensor:
        return self.linear((features - self.mean) / self.std)


def fit_probe(
    features: Tensor, labels: Tensor, num_classes: int, recipe: ProbeRecipe = ProbeRecipe()
) -> LinearProbe:
    """Fit the probe by full-batch L-BFGS (strong Wolfe line search); returns it in eval mode.

    The std is floored at a tenth of the mean std: near-constant inputs (blank border pixels of
    the raw-pixel reference) would otherwise be blown up, and with them any perturbation there."""
    features = features.float()
    mean, std = features.mean(0), features.std(0)
    probe = LinearProbe(mean, std.clamp_min(0.1 * float(std.mean()) + 1e-12), num_classes)
    x = (features - probe.mean) / probe.std
    optimizer = torch.optim.LBFGS(
        probe.linear.parameters(),
        lr=1.0,
        max_iter=recipe.iters,
        history_size=20,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        penalty = 0.5 * recipe.weight_decay * probe.linear.weight.square().sum()
        loss = F.cross_entropy(probe.linear(x), labels) + penalty
        loss.backward()
        return loss

    optimizer.step(closure)
    return probe.eval()


@torch.no_grad()
def predict(net: nn.Module, inputs: Tensor, batch_size: int = 1024) -> Tensor:
    """Predicted classes [N] of a network mapping a batch to logits."""
    return torch.cat([net(chunk).argmax(dim=1) for chunk in inputs.split(batch_size)])


def top1(net: nn.Module, inputs: Tensor, labels: Tensor, batch_size: int = 1024) -> float:
    return (predict(net, inputs, batch_size) == labels).float().mean().item()


def balanced_subset(labels: Tensor, fraction: float, seed: int) -> Tensor:
    """Indices of `fraction` of each class (at least one image per class), sorted, seeded.

    Per class rather than overall, so 1% of a 10-class set is 1% of every class and no class
    goes missing by chance."""
    generator = torch.Generator().manual_seed(seed)
    picked = []
    for cls in labels.unique(sorted=True):
        members = (labels == cls).nonzero().flatten()
        count = max(1, round(fraction * len(members)))
        picked.append(members[torch.randperm(len(members), generator=generator)[:count]])
    return torch.cat(picked).sort().values


def symmetric_noise(labels: Tensor, rate: float, num_classes: int, seed: int) -> Tensor:
    """Labels with exactly round(rate x N) of them, chosen at random, moved to a uniformly drawn
    *other* class: the realised noise rate is `rate` itself, and rate 0 returns the labels."""
    generator = torch.Generator().manual_seed(seed)
    noisy = labels.clone()
    flipped = torch.randperm(len(labels), generator=generator)[: round(rate * len(labels))]
    shift = torch.randint(1, num_classes, (len(flipped),), generator=generator)
    noisy[flipped] = (labels[flipped] + shift) % num_classes
    return noisy
