"""Weighted cosine kNN (InstDisc / the MoCo demo) for several k from one neighbour search.

`moco.knn.knn_predict` searches once per k; the bank here is 60k x D and the search is the cost
(for raw pixels, D = 784: seconds per pass), so the largest k is searched once and every smaller
k votes with the leading columns of the same sorted neighbour list. Same votes, same answer.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def knn_top1(
    bank: Tensor,
    bank_labels: Tensor,
    queries: Tensor,
    labels: Tensor,
    num_classes: int,
    ks: list[int],
    t: float,
    chunk_size: int = 1024,
) -> dict[int, float]:
    """Top-1 accuracy per k of exp(cos / t)-weighted votes; features must be L2-normalised."""
    k_max = min(max(ks), bank.shape[0])
    correct = dict.fromkeys(ks, 0)
    for chunk, truth in zip(queries.split(chunk_size), labels.split(chunk_size), strict=True):
        sim, idx = (chunk @ bank.T).topk(k_max, dim=1)  # sorted, most similar first
        weights, neighbour_labels = (sim.float() / t).exp(), bank_labels[idx]
        for k in ks:
            k_used = min(k, k_max)
            scores = torch.zeros(chunk.shape[0], num_classes)
            scores.scatter_add_(1, neighbour_labels[:, :k_used], weights[:, :k_used])
            correct[k] += int((scores.argmax(dim=1) == truth).sum())
    return {k: correct[k] / len(labels) for k in ks}
