"""How far newly arrived images are from the data a model was trained on, in its own
embedding space: the squared maximum mean discrepancy (MMD, Gretton et al. 2012) with a
Gaussian kernel, and a permutation p-value (how often randomly relabelled old/new sets differ
as much). A small p-value says the new data is distributed differently; MMD^2 says how much.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Drift:
    mmd2: float  # unbiased estimate; ~0 (can dip below) when both sets come from one distribution
    p_value: float
    old: int  # samples compared from each side
    new: int


@torch.no_grad()
def mmd_drift(old: Tensor, new: Tensor, *, permutations: int, seed: int) -> Drift:
    """MMD^2 between feature sets [N, D] and [M, D] with the median-distance bandwidth."""
    pooled = torch.cat([old, new]).double()
    squared = torch.cdist(pooled, pooled).pow(2)
    bandwidth = squared[squared > 0].median() if bool((squared > 0).any()) else squared.new_ones(())
    kernel = torch.exp(-squared / bandwidth)
    n = len(old)
    observed = _mmd2(kernel, torch.arange(len(pooled)), n)
    generator = torch.Generator().manual_seed(seed)
    as_large = sum(
        _mmd2(kernel, torch.randperm(len(pooled), generator=generator), n) >= observed
        for _ in range(permutations)
    )
    return Drift(observed, (1 + as_large) / (1 + permutations), n, len(new))


def _mmd2(kernel: Tensor, order: Tensor, n: int) -> float:
    """Unbiased MMD^2 of the split (order[:n], order[n:]) of a pooled kernel matrix."""
    x, y = order[:n], order[n:]
    kxx, kyy, kxy = kernel[x][:, x], kernel[y][:, y], kernel[x][:, y]
    m = len(y)
    within_x = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    within_y = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(within_x + within_y - 2 * kxy.mean())
