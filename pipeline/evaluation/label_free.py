"""Label-free measures of an embedding, for data that has no labels at all.

- RankMe (Garrido et al. 2023): the effective rank of the embedding matrix, exp of the entropy of
  its normalised singular values. A collapsed encoder has rank ~1; a healthy one spreads over
  many directions. Higher is better, but a random network or raw pixels can score high too.
- Alignment and uniformity (Wang & Isola 2020), on L2-normalised features: alignment is the mean
  squared distance between two augmented views of one image (lower: invariant to the
  augmentations); uniformity is log E exp(-2 ||x - y||^2) over pairs of different images (lower:
  spread over the sphere). Both lower-is-better; each alone is easy to game (a constant encoder
  aligns perfectly), so read them together.
- Neighbourhood agreement: how many of each image's k nearest neighbours two encoders share. It
  says how far a new encoder moved from production, not which one is better.
"""

from __future__ import annotations

import torch
from torch import Tensor

EPSILON = 1e-7


@torch.no_grad()
def rankme(features: Tensor) -> float:
    """exp(entropy) of the singular value distribution of features [N, D] (1 <= rank <= min)."""
    singular = torch.linalg.svdvals(features.double())
    p = singular / singular.sum() + EPSILON
    return float(torch.exp(-(p * p.log()).sum()))


@torch.no_grad()
def alignment(view_a: Tensor, view_b: Tensor) -> float:
    """E ||f(x) - f(x+)||^2 over positive pairs (rows of two L2-normalised feature matrices)."""
    return float((view_a - view_b).pow(2).sum(dim=1).mean())


@torch.no_grad()
def uniformity(features: Tensor, t: float = 2.0) -> float:
    """log E_{i != j} exp(-t ||f_i - f_j||^2) over L2-normalised features."""
    distances = torch.pdist(features.double()).pow(2)
    return float(torch.logsumexp(-t * distances, dim=0) - torch.log(torch.tensor(len(distances))))


@torch.no_grad()
def neighbourhood_agreement(a: Tensor, b: Tensor, k: int) -> float:
    """Mean fraction of shared k-nearest neighbours (cosine, self excluded) of the same images
    embedded by two encoders: 1 = the same neighbourhoods, ~k/N = unrelated."""
    k = min(k, len(a) - 1)
    in_a, in_b = _knn_sets(a, k), _knn_sets(b, k)
    return float((in_a.unsqueeze(2) == in_b.unsqueeze(1)).any(2).float().mean())


def _knn_sets(features: Tensor, k: int) -> Tensor:
    similarity = features @ features.T
    similarity.fill_diagonal_(-float("inf"))
    return similarity.topk(k, dim=1).indices
